"""Sample images that fit the served model, for the inspector page (GET /samples, /samples/{name}).

A model of the generated shapes gets one shape of each class, drawn by the same generator that made
its training data; any other (ImageNet, a user's photos) gets scikit-image's sample photos, which
ship inside the package (no download).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

# scikit-image's sample photos: the name the page shows -> skimage.data's function
PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut"}
SHAPE_SIZE = 128  # px: drawn larger than the model's input, as a user's image would be


def sample_names(dataset: str) -> list[str]:
    if dataset == "shapes":
        from training.shapes import CLASSES

        return list(CLASSES)
    return list(PHOTOS)


@lru_cache(maxsize=32)
def sample_image(dataset: str, name: str) -> tuple[bytes, str]:
    """The sample's encoded bytes and media type; KeyError for a name this dataset has none of."""
    if name not in sample_names(dataset):
        raise KeyError(name)
    if dataset == "shapes":
        from training.shapes import CLASSES, render

        pixels = render(CLASSES.index(name), SHAPE_SIZE, np.random.default_rng(CLASSES.index(name)))
        return _encode(pixels, "PNG"), "image/png"
    import skimage.data

    return _encode(getattr(skimage.data, PHOTOS[name])(), "JPEG"), "image/jpeg"


def _encode(pixels: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()
