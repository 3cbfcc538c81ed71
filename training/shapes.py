"""The built-in `shapes` dataset: generated images of what early CNN layers detect.

Each class is a visual primitive from the lecture -- oriented stripes (edges),
corners, crosses, filled and outlined circles/squares/triangles, checker
textures -- drawn at a random position, scale, rotation and colour over a
cluttered, noisy background. Nothing is downloaded: image i of a split is a
pure function of (split, seed, i), so the data is the same on every machine,
and train and test come from disjoint random streams.

    python -m training.shapes --out data/shapes --per-class 20   # look at it as PNGs
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = (
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal",
    "corner",
    "cross",
    "circle",
    "circle_outline",
    "square",
    "square_outline",
    "triangle",
    "triangle_outline",
    "checker",
)
_SPLIT_STREAM = {"train": 0, "test": 1}


def _colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and background colour far enough apart to see the shape."""
    while True:
        fg = rng.integers(0, 256, 3)
        bg = rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() > 180:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _rotated(points: np.ndarray, angle: float, center: np.ndarray) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return [tuple(p) for p in (points @ rotation.T + center)]


def _background(size: int, bg: tuple[int, ...], rng: np.random.Generator) -> Image.Image:
    # A soft gradient plus a few faint colour patches: clutter the net must ignore.
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-25, 25, 3)
    image = np.clip(np.asarray(bg, dtype=np.float32) + ramp, 0, 255).astype(np.uint8)
    image = np.broadcast_to(image, (size, size, 3)).copy()
    for _ in range(rng.integers(0, 3)):
        r = int(rng.integers(size // 16, size // 8 + 1))
        x, y = rng.integers(0, size, 2)
        patch = rng.integers(0, 256, 3)
        image[max(0, y - r) : y + r, max(0, x - r) : x + r] = (
            0.7 * image[max(0, y - r) : y + r, max(0, x - r) : x + r] + 0.3 * patch
        ).astype(np.uint8)
    return Image.fromarray(image)


def _draw_stripes(draw, size, fg, rng, orientation: str):
    period = rng.uniform(size / 9, size / 5)
    width = period * rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, period)
    if orientation == "diagonal":
        angle = math.radians(45 if rng.random() < 0.5 else 135)
    else:
        angle = 0.0 if orientation == "horizontal" else math.pi / 2
    angle += math.radians(rng.uniform(-8, 8))
    # Stripes are long bars across a big square, rotated about the image centre.
    center = np.array([size / 2, size / 2]) + rng.uniform(-size / 8, size / 8, 2)
    reach = size
    offset = -reach + phase
    while offset < reach:
        bar = np.array([[-reach, offset], [reach, offset], [reach, offset + width], [-reach, offset + width]])
        draw.polygon(_rotated(bar, angle, center), fill=fg)
        offset += period


def _draw_checker(draw, size, fg, rng):
    cell = rng.uniform(size / 9, size / 5)
    angle = math.radians(rng.uniform(-10, 10))
    center = np.array([size / 2, size / 2]) + rng.uniform(-size / 8, size / 8, 2)
    n = int(size / cell) + 2
    for i in range(-n, n):
        for j in range(-n, n):
            if (i + j) % 2 == 0:
                square = np.array([[i, j], [i + 1, j], [i + 1, j + 1], [i, j + 1]]) * cell
                draw.polygon(_rotated(square, angle, center), fill=fg)


def _draw_shape(draw, size, fg, rng, name: str):
    scale = rng.uniform(0.28, 0.42) * size  # half-extent of the shape
    margin = scale + 2
    center = rng.uniform(margin, size - margin, 2)
    outline = name.endswith("_outline")
    line = max(2, round(size / 24))
    angle = rng.uniform(0, 2 * math.pi)
    base = name.removesuffix("_outline")
    if base == "circle":
        box = [center[0] - scale, center[1] - scale, center[0] + scale, center[1] + scale]
        if outline:
            draw.ellipse(box, outline=fg, width=line)
        else:
            draw.ellipse(box, fill=fg)
        return
    if base in ("square", "triangle"):
        corners = 4 if base == "square" else 3
        points = np.array(
            [[math.cos(2 * math.pi * k / corners), math.sin(2 * math.pi * k / corners)] for k in range(corners)]
        ) * scale
        polygon = _rotated(points, angle, center)
        if outline:
            draw.line(polygon + [polygon[0]], fill=fg, width=line, joint="curve")
        else:
            draw.polygon(polygon, fill=fg)
        return
    thickness = rng.uniform(0.12, 0.22) * scale
    if base == "cross":
        arms = [np.array([[-scale, -thickness], [scale, -thickness], [scale, thickness], [-scale, thickness]])]
        arms.append(arms[0][:, ::-1])
    elif base == "corner":  # an L: two arms meeting at a right angle
        arms = [
            np.array([[-scale, -scale], [-scale + 2 * thickness, -scale], [-scale + 2 * thickness, scale], [-scale, scale]]),
            np.array([[-scale, scale - 2 * thickness], [scale, scale - 2 * thickness], [scale, scale], [-scale, scale]]),
        ]
    else:
        raise ValueError(f"unknown shape class {name!r}")
    for arm in arms:
        draw.polygon(_rotated(arm, angle, center), fill=fg)


def render(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `class_index` as uint8 (size, size, 3)."""
    name = CLASSES[class_index]
    fg, bg = _colors(rng)
    image = _background(size, bg, rng)
    draw = ImageDraw.Draw(image)
    if name.startswith("stripes_"):
        _draw_stripes(draw, size, fg, rng, name.removeprefix("stripes_"))
    elif name == "checker":
        _draw_checker(draw, size, fg, rng)
    else:
        _draw_shape(draw, size, fg, rng, name)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(2, 12), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(split: str, per_class: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, size, size) and labels int64 (N,), classes interleaved."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {list(_SPLIT_STREAM)}")
    count = per_class * len(CLASSES)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.arange(count) % len(CLASSES)
    for i in range(count):
        rng = np.random.default_rng([_SPLIT_STREAM[split], seed, i])
        images[i] = render(int(labels[i]), size, rng)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def export_image_folder(out: Path, per_class: int, size: int, seed: int) -> None:
    for split in ("train", "test"):
        images, labels = generate(split, per_class if split == "train" else max(1, per_class // 4), size, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = out / split / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description="write the shapes dataset as an ImageFolder of PNGs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    export_image_folder(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {args.out}/train and {args.out}/test ({len(CLASSES)} classes)")


if __name__ == "__main__":
    main()
