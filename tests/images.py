"""Test images made in code: shapes of known class, and odd encodings."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from training.shapes import render


def shape_image(class_index: int, size: int = 64, seed: int = 123) -> Image.Image:
    return Image.fromarray(render(class_index, size, np.random.default_rng([7, seed, class_index])))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def shape_png(class_index: int = 0, size: int = 64) -> bytes:
    return encode(shape_image(class_index, size))
