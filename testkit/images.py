"""Request images made in code: shapes of known class, real photos, odd encodings.

The photos are scikit-image's bundled samples (no download), re-encoded as
JPEG and PNG at several sizes so the service decodes what clients really send.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.shapes import CLASSES, render

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@dataclass(frozen=True)
class EncodedImage:
    name: str
    data: bytes
    content_type: str


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def shape_image(class_index: int, size: int = 64, seed: int = 123) -> Image.Image:
    return Image.fromarray(render(class_index, size, np.random.default_rng([7, seed, class_index])))


def shape_png(class_index: int = 0, size: int = 64) -> bytes:
    return encode(shape_image(class_index, size))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def photos(sizes: tuple[int, ...] = (640, 320), formats: tuple[str, ...] = ("JPEG",)) -> list[EncodedImage]:
    """Each sample photo, longer side resized to each size, in each format (JPEG at quality 90)."""
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
                data = encode(resized, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                out.append(EncodedImage(f"{name}_{size}.{fmt.lower()}", data, f"image/{fmt.lower()}"))
    return out


def shapes(count: int = 12, size: int = 64) -> list[EncodedImage]:
    """`count` generated shapes as PNG, cycling through the classes."""
    out = []
    for index in range(count):
        pixels = render(index % len(CLASSES), size, np.random.default_rng([11, index]))
        out.append(EncodedImage(f"shape_{index}.png", encode(Image.fromarray(pixels), "PNG"), "image/png"))
    return out


def request_pool() -> list[EncodedImage]:
    """The mix load tests send: photos of varied sizes as JPEG and PNG, plus generated shapes."""
    return photos((640, 320), ("JPEG",)) + photos((256,), ("PNG",)) + shapes()
