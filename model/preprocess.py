"""The one preprocessing path: bytes -> RGB pixels -> resized crop -> normalized batch.

Training, evaluation and serving all call these functions with the
`Preprocessing` stored in the checkpoint, so there is no train/serve skew.

Decoding checks the header first (PIL reads only the header on open), so a
decompression bomb -- a tiny file that claims 30000x30000 pixels -- is refused
before a single pixel is allocated.

JPEGs decode straight to about the size the model needs: a JPEG stores 8x8
blocks of frequencies, and libjpeg-turbo (through simplejpeg) can rebuild
each block at 1/8, 2/8, ... of its size by keeping only the low frequencies
-- a proper low-pass, for the price of decoding the small image.
We ask for the smallest such scale that still leaves the shorter side at
least `resize_size`, then resize the rest of the way. A 1280x960 photo for
the 64-pixel `small` preset decodes at 1/8 (160x120); measured here: 4.3 ms
-> 1.7 ms for it, 16 ms -> 6 ms for a 3000x2000 photo (BENCHMARKS.md). Other
formats (PNG, WebP, GIF, BMP) and CMYK JPEGs decode through Pillow.
torchvision's PNG decoder crashed the whole process (segmentation fault) on
a PNG with a bad CRC in our fuzzing, and a request must never be able to
kill the worker, so no torchvision decoder runs on the CPU request path.

Pixels are kept height x width x channel (HWC), the order decoders produce:
a batch of such images is channels-last already, the layout the convs want.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from model.config import Preprocessing

# Parsers we accept. Restricting PIL to these keeps rarely used, less audited
# format plugins off the request path.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse inputs bigger than these before decoding them."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # 4000x3000 photos pass; 30000x30000 bombs do not


class ImageRejected(ValueError):
    """An input that is not a usable image. `reason` is a short stable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def open_header(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """The image's header, checked against the limits; no pixel decoded yet."""
    if not data:
        raise ImageRejected("empty", "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "too_many_bytes", f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,}"
        )
    try:
        header = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        claimed = _sniff_format(data)
        if claimed:
            raise ImageRejected("corrupt", f"the {claimed} header is invalid (zero size, or mangled)") from None
        raise ImageRejected(
            "not_an_image", f"not a supported image; accepted formats: {', '.join(SUPPORTED_FORMATS)}"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises assorted errors on mangled headers
        raise ImageRejected("corrupt", f"unreadable image header: {err}") from None
    width, height = header.size
    if width <= 0 or height <= 0:
        raise ImageRejected("zero_size", f"the image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}",
        )
    return header


def decode_pixels(data: bytes, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 pixels (H, W, 3).

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped),
    CMYK and 16-bit images become 8-bit RGB; an animated GIF gives its first
    frame. With `min_side`, a JPEG may come out smaller than stored, down to
    the scale that keeps both sides >= min_side. Raises ImageRejected with a
    reason code otherwise.
    """
    header = open_header(data, limits)
    if header.format == "JPEG" and header.mode in ("RGB", "L"):  # not CMYK/YCCK: libjpeg can't make RGB of those
        return _decode_jpeg(data, header, min_side)
    return _decode_pil(header)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Decode encoded image bytes to an RGB uint8 tensor (3, H, W) at full size (see decode_pixels)."""
    return torch.from_numpy(decode_pixels(data, limits)).permute(2, 0, 1)


def _sniff_format(data: bytes) -> str | None:
    """The format a file's magic bytes claim, to tell 'broken PNG' from 'not an image'."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


# EXIF orientation -> how to turn stored pixels (H, W, C) upright (as PIL's ImageOps.exif_transpose does)
_ORIENT = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # rotated 90 clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # rotated 90 counter-clockwise to display
}


def _decode_jpeg(data: bytes, header: Image.Image, min_side: int | None) -> np.ndarray:
    size = min(min_side, *header.size) if min_side else None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size or 0, min_width=size or 0)
        orientation = header.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as err:  # libjpeg-turbo's message: truncated, corrupt, unsupported
        raise ImageRejected("corrupt", f"the JPEG data is truncated or corrupt: {_first_line(err)}") from None
    turn = _ORIENT.get(orientation)
    return np.ascontiguousarray(turn(pixels)) if turn else pixels


def _decode_pil(image: Image.Image) -> np.ndarray:
    try:
        image.seek(0)  # first frame of an animation
        image = ImageOps.exif_transpose(image)
        image.load()
        if image.mode in _WIDE_GRAY_MODES:
            return _wide_gray_to_rgb(image)
        rgb = image.convert("RGB")
    except Exception as err:
        raise ImageRejected("corrupt", f"the {image.format} data is truncated or corrupt: {err}") from None
    return np.array(rgb)


# 16- and 32-bit grayscale; PIL's convert("RGB") would clip them at 255 instead of scaling.
_WIDE_GRAY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _wide_gray_to_rgb(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.int64)
    gray = np.clip(values >> 8, 0, 255).astype(np.uint8)  # keep the 8 high bits
    return np.repeat(gray[:, :, None], 3, axis=2)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1][:200]


def resize_and_crop(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, S, S): shorter side to resize_size (antialiased bilinear), center crop S."""
    _, height, width = pixels.shape
    if height == width == prep.input_size:
        return pixels
    if min(height, width) != prep.resize_size:
        pixels = TF.resize(pixels, [prep.resize_size], antialias=True)
    return TF.center_crop(pixels, [prep.input_size, prep.input_size])


def load_pixels(data: bytes, prep: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded bytes -> uint8 (S, S, 3), contiguous, ready to stack into a channels-last batch.
    The serving path (and, through load_image, the ImageFolder one)."""
    pixels = torch.from_numpy(decode_pixels(data, limits, min_side=prep.resize_size)).permute(2, 0, 1)
    return np.ascontiguousarray(resize_and_crop(pixels, prep).permute(1, 2, 0).numpy())


def load_image(data: bytes, prep: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, S, S) (a view of HWC memory)."""
    return torch.from_numpy(load_pixels(data, prep, limits)).permute(2, 0, 1)


class Normalizer:
    """uint8 (N, 3, S, S) batch -> float, scaled to [0, 1] and standardized per channel.

    Runs on the batch's device, so on a GPU the uint8 batch (4x smaller than
    float32) crosses PCIe and the arithmetic happens there.
    """

    def __init__(self, prep: Preprocessing):
        self._mean = torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0)

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mean = self._mean.to(batch.device)
        inv_std = self._inv_std.to(batch.device)
        return ((batch.float() - mean) * inv_std).to(dtype)
