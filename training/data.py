"""Datasets: the generated `shapes` set, or any ImageFolder directory on disk.

Both end as uint8 image tensors at the model's input size, produced by the
same `model.preprocess` path the service uses. Datasets that fit in memory
(shapes, CIFAR-sized folders) are decoded once; the training loop then slices
batches out of one tensor, which on a 2-core CPU is much cheaper than a
per-image DataLoader.

Unreadable files in an ImageFolder are skipped and counted (the count is
printed and stored in the checkpoint's training summary); a folder with no
readable image in some class is an error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model.config import Preprocessing
from model.preprocess import ImageRejected, load_image
from training import shapes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
TEST_SPLIT_NAMES = ("test", "val")


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says what to fix."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    test: Split
    skipped_files: list[str] = field(default_factory=list)


def load_dataset(
    data: str,
    prep: Preprocessing,
    seed: int = 0,
    shapes_per_class: int = 800,
    test_fraction: float = 0.2,
    show_progress: bool = True,
) -> Dataset:
    """`data` is "shapes" or a directory in ImageFolder layout."""
    if data == "shapes":
        train = shapes.generate("train", shapes_per_class, prep.input_size, seed)
        test = shapes.generate("test", max(1, shapes_per_class // 4), prep.input_size, seed)
        return Dataset("shapes", list(shapes.CLASSES), Split(*train), Split(*test))
    return load_image_folder(Path(data), prep, seed, test_fraction, show_progress)


def _list_classes(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"{root}: class folders with no images: {', '.join(empty)}")
    return classes


def load_image_folder(
    root: Path, prep: Preprocessing, seed: int = 0, test_fraction: float = 0.2, show_progress: bool = True
) -> Dataset:
    """root/train/<class>/* with root/test or root/val; or root/<class>/* split reproducibly."""
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    test_dir = next((root / name for name in TEST_SPLIT_NAMES if (root / name).is_dir()), None)
    if (root / "train").is_dir():
        if test_dir is None:
            raise DataError(f"{root}: has train/ but no test/ or val/ folder")
        train_files = _list_classes(root / "train")
        test_files = _list_classes(test_dir)
        if set(test_files) - set(train_files):
            raise DataError(
                f"{test_dir}: classes not in train/: {', '.join(sorted(set(test_files) - set(train_files)))}"
            )
    else:
        # A single-level folder: hold out the same files for every run with this seed.
        train_files, test_files = {}, {}
        rng = random.Random(seed)
        for name, files in _list_classes(root).items():
            files = files[:]
            rng.shuffle(files)
            held_out = max(1, round(len(files) * test_fraction)) if len(files) > 1 else 0
            test_files[name], train_files[name] = files[:held_out], files[held_out:]
    class_names = sorted(train_files)
    skipped: list[str] = []
    train = _decode_split(train_files, class_names, prep, skipped, "train", show_progress)
    test = _decode_split(test_files, class_names, prep, skipped, "test", show_progress)
    for split_name, split in (("train", train), ("test", test)):
        present = set(split.labels.tolist())
        missing = [class_names[i] for i in range(len(class_names)) if i not in present]
        if split_name == "train" and missing:
            raise DataError(f"{root}: no readable training image in classes: {', '.join(missing)}")
    if len(test.labels) == 0:
        raise DataError(f"{root}: no readable test images")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]}")
    return Dataset(root.name, class_names, train, test, skipped)


def _decode_split(
    files: dict[str, list[Path]],
    class_names: list[str],
    prep: Preprocessing,
    skipped: list[str],
    split_name: str,
    show_progress: bool,
) -> Split:
    items = [(path, class_names.index(name)) for name, paths in files.items() for path in paths]
    images, labels = [], []
    for path, label in tqdm(items, desc=f"decoding {split_name}", unit="img", disable=not show_progress, leave=False):
        try:
            images.append(load_image(path.read_bytes(), prep))
        except (ImageRejected, OSError) as err:
            skipped.append(f"{path}: {err}")
            continue
        labels.append(label)
    size = prep.input_size
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return Split(stacked, torch.tensor(labels, dtype=torch.int64))
