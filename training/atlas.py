"""`python -m training atlas RUN_DIR --data DIR`: build a checkpoint's channel atlas (model.atlas).

Runs the dataset through the model once (batched, on the GPU when there is
one), then writes the atlas next to the checkpoint -- atlas/atlas.json and a
PNG sprite per conv layer -- and lists the files, with their sha256, in the
manifest, so they are verified on load and carried into the model store by
`register`. `--data shapes` draws the generated test split; a directory is
read in ImageFolder layout, every image of every split.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from model import atlas
from model.checkpoint import attach_files, load_checkpoint
from model.preprocess import ImageRejected, Normalizer, load_image
from training import shapes
from training.data import IMAGE_SUFFIXES, DataError


def load_images(data: str, input_size, prep, per_class: int, seed: int, limit: int | None) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (N, 3, S, S) and a name per image (its file, or shapes/<split>/<index>)."""
    if data == "shapes":
        images, _ = shapes.generate("test", per_class, input_size, seed)
        return images[:limit], [f"shapes/test/{i}" for i in range(len(images))][:limit]
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    decoded, names = [], []
    for path in files:
        try:
            decoded.append(load_image(path.read_bytes(), prep))
        except (ImageRejected, OSError):
            continue
        names.append(str(path.relative_to(root)))
    if not decoded:
        raise DataError(f"{root}: no readable images")
    return torch.stack(decoded), names


def build_atlas(run_dir: Path, data: str, per_class: int = 100, seed: int = 0, limit: int | None = None,
                device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = load_checkpoint(run_dir)
    prep = checkpoint.manifest.preprocessing
    started = time.perf_counter()
    images, sources = load_images(data, prep.input_size, prep, per_class, seed, limit)
    loaded = time.perf_counter()
    files = atlas.build(checkpoint.model, images, sources, Normalizer(prep), device, dataset=data)
    attach_files(run_dir, files)
    done = time.perf_counter()
    print(f"atlas of {run_dir}: {len(images)} images of {data}, {len(files) - 1} conv layers, "
          f"{sum(len(b) for b in files.values()) / 2**20:.1f} MiB; {loaded - started:.1f}s to load the images, "
          f"{done - loaded:.1f}s to build on {device}")
    return {"images": len(images), "load_seconds": loaded - started, "build_seconds": done - loaded}
