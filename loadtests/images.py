"""Request images for load tests and benchmarks: real photos and generated shapes.

The photos are scikit-image's bundled samples (no download), re-encoded as
JPEG and PNG at several sizes so the service decodes what clients really send.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@dataclass(frozen=True)
class EncodedImage:
    name: str
    data: bytes
    content_type: str


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def photos(sizes: tuple[int, ...] = (640, 320), formats: tuple[str, ...] = ("JPEG",)) -> list[EncodedImage]:
    """Each sample photo, longer side resized to each size, in each format."""
    import skimage.data

    out = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        image = Image.fromarray(pixels).convert("RGB")
        for size in sizes:
            scale = size / max(image.size)
            resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                   Image.Resampling.BICUBIC)
            for fmt in formats:
                out.append(EncodedImage(f"{name}_{size}.{fmt.lower()}", _encode(resized, fmt), f"image/{fmt.lower()}"))
    return out


def shapes(count: int = 12, size: int = 64) -> list[EncodedImage]:
    from training.shapes import CLASSES, render

    out = []
    for index in range(count):
        pixels = render(index % len(CLASSES), size, np.random.default_rng([11, index]))
        out.append(EncodedImage(f"shape_{index}.png", _encode(Image.fromarray(pixels), "PNG"), "image/png"))
    return out


def request_pool() -> list[EncodedImage]:
    """The mix load tests send: photos of varied sizes as JPEG and PNG, plus generated shapes."""
    return photos((640, 320), ("JPEG",)) + photos((256,), ("PNG",)) + shapes()
