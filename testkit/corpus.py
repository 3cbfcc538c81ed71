"""A corpus of bad and odd requests, made by code. Each case: how to send it, and what must come back."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from testkit.images import b64, encode, png_header_only, shape_image


@dataclass
class Case:
    name: str
    path: str
    kwargs: dict = field(default_factory=dict)
    status: int = 200
    reason: str | None = None  # the `error` code for refusals


def _files(data: bytes, name: str = "x.png", content_type: str = "image/png") -> dict:
    return {"files": [("images", (name, data, content_type))]}


def _photo(width: int, height: int) -> Image.Image:
    """A large, smooth picture (a camera-sized JPEG of it is well under the body limit)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                       np.broadcast_to((x + y) / 2, (height, width))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(shape_image(2, 80), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [shape_image(i, 64).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(encode(shape_image(0, 64), "PNG"))
    data[-20] ^= 0xFF
    return bytes(data)


def build(max_body_bytes: int) -> list[Case]:
    png = encode(shape_image(1, 64), "PNG")
    jpeg = encode(shape_image(3, 64), "JPEG")
    sixteen_bit = encode(Image.fromarray(np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64)), "PNG")
    bad = [
        Case("empty body", "/classify", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "no_image"),
        Case("empty image", "/classify", {"json": {"images_base64": [""]}}, 422, "empty"),
        Case("non-image bytes", "/classify", _files(b"GIF? no: plain text pretending"), 422, "not_an_image"),
        Case("truncated JPEG", "/classify", _files(jpeg[: len(jpeg) // 2], "x.jpg", "image/jpeg"), 422, "corrupt"),
        Case("PNG with a bad CRC", "/classify", _files(_bad_crc_png()), 422, "corrupt"),
        Case("30000x30000 PNG bomb", "/classify", _files(png_header_only(30000, 30000)), 422, "too_many_pixels"),
        Case("huge base64 string", "/classify", {"content": json.dumps({"images_base64": ["A" * (max_body_bytes + 10)]}).encode(),
                                                 "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
        Case("wrong content type", "/classify", {"content": png, "headers": {"content-type": "image/png"}}, 400, None),
        Case("invalid JSON", "/classify", {"content": b'{"images_base64": [', "headers": {"content-type": "application/json"}}, 400, None),
        Case("non-UTF-8 JSON", "/classify", {"content": b'{"images_base64": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}}, 400, None),
        Case("invalid base64", "/classify", {"json": {"images_base64": ["%%%"]}}, 400, "invalid_base64"),
        Case("negative top_k", "/classify", {"json": {"images_base64": [b64(png)], "top_k": -3}}, 400, None),
        Case("huge top_k", "/classify", {"json": {"images_base64": [b64(png)], "top_k": 10**12}}, 400, None),
        Case("unknown layer", "/feature_maps", {"json": {"image_base64": b64(png), "layers": ["conv42"]}}, 422, "unknown_layer"),
        Case("path-like layer", "/feature_maps", {"json": {"image_base64": b64(png), "layers": ["../../etc/passwd"]}}, 422, "unknown_layer"),
        Case("channel out of range", "/feature_maps", {"json": {"image_base64": b64(png), "layers": ["conv1"], "channels": [10**6]}}, 422, "channel_out_of_range"),
        Case("too many images", "/classify", {"json": {"images_base64": [b64(png)] * 17}}, 413, "too_many_images"),
        Case("URL instead of a file", "/classify", {"files": [("images", (None, "http://169.254.169.254/latest"))]}, 400, "file_field_not_a_file"),
        Case("malformed multipart", "/classify", {"content": b"--x\r\n[]--x--\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed_multipart"),
        Case("multipart without boundary", "/embed", {"content": b"", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_multipart"),
        Case("unknown kernels layer", "/kernels?layer=fc6", {}, 422, "unknown_layer"),
        Case("Grad-CAM of a vector layer", "/gradcam", {"json": {"image_base64": b64(png), "layer": "fc7"}}, 422,
             "unknown_layer"),
        Case("Grad-CAM of a class that does not exist", "/gradcam",
             {"json": {"image_base64": b64(png), "class_index": 10**6}}, 422, "class_out_of_range"),
    ]
    good = [
        Case("grayscale PNG", "/classify", _files(encode(shape_image(4, 64).convert("L"), "PNG"))),
        Case("palette PNG", "/classify", _files(encode(shape_image(5, 64).convert("P"), "PNG"))),
        Case("RGBA PNG", "/classify", _files(encode(shape_image(6, 64).convert("RGBA"), "PNG"))),
        Case("CMYK JPEG", "/classify", _files(encode(shape_image(7, 64).convert("CMYK"), "JPEG"), "x.jpg", "image/jpeg")),
        Case("16-bit PNG", "/classify", _files(sixteen_bit)),
        Case("animated GIF", "/classify", _files(_animated_gif(), "x.gif", "image/gif")),
        Case("EXIF-rotated JPEG", "/classify", _files(_exif_rotated(), "x.jpg", "image/jpeg")),
        Case("WebP", "/classify", _files(encode(shape_image(8, 64), "WEBP"), "x.webp", "image/webp")),
        Case("BMP", "/classify", _files(encode(shape_image(9, 64), "BMP"), "x.bmp", "image/bmp")),
        Case("1x1 image", "/classify", _files(encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"))),
        Case("4000x3000 photo", "/classify", _files(encode(_photo(4000, 3000), "JPEG", quality=70), "x.jpg", "image/jpeg")),
        Case("data URL base64", "/classify", {"json": {"images_base64": [f"data:image/png;base64,{b64(png)}"]}}),
    ]
    return bad + good
