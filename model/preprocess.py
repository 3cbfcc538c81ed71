"""The one preprocessing path: bytes -> RGB pixels -> resized crop -> normalized batch.

Training, evaluation and serving all call these functions with the
`Preprocessing` stored in the checkpoint, so there is no train/serve skew.

Decoding checks the header first (PIL reads only the header on open), so a
decompression bomb -- a tiny file that claims 30000x30000 pixels -- is refused
before a single pixel is allocated. The pixels themselves are decoded by
torchvision.io where that is safe and faster (libjpeg-turbo, libwebp: about
0.6 ms for a 400x300 JPEG here against 0.8 ms through PIL). PNG, GIF and BMP
go through PIL: torchvision's PNG decoder crashed the whole process
(segmentation fault) on a PNG with a bad CRC in our fuzzing, and a request
must never be able to kill the worker.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image
from torchvision.transforms.v2 import functional as TF

from model.config import Preprocessing

# torchvision 0.29 deprecates its image codecs in favour of torchcodec; we pin
# 0.29 and keep the faster path, without a warning on every request.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# Parsers we accept. Restricting PIL to these keeps rarely used, less audited
# format plugins off the request path.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_TORCHVISION_FORMATS = {"JPEG", "WEBP"}  # fuzzed here without a crash; PNG was not


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


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Decode encoded image bytes to an RGB uint8 tensor of shape (3, H, W).

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped),
    CMYK and 16-bit images become 8-bit RGB; an animated GIF gives its first
    frame. Raises ImageRejected with a reason code otherwise.
    """
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
    if header.format in _TORCHVISION_FORMATS:
        return _decode_torchvision(data, header.format)
    return _decode_pil(header)


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


def _decode_torchvision(data: bytes, fmt: str) -> torch.Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        pixels = tv_decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as err:
        raise ImageRejected("corrupt", f"the {fmt} data is truncated or corrupt: {_first_line(err)}") from None
    return pixels


def _decode_pil(image: Image.Image) -> torch.Tensor:
    try:
        image.seek(0)  # first frame of an animation
        image = ImageOps.exif_transpose(image)
        image.load()
        if image.mode in _WIDE_GRAY_MODES:
            return _wide_gray_to_rgb(image)
        rgb = image.convert("RGB")
    except Exception as err:
        raise ImageRejected("corrupt", f"the {image.format} data is truncated or corrupt: {err}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


# 16- and 32-bit grayscale; PIL's convert("RGB") would clip them at 255 instead of scaling.
_WIDE_GRAY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _wide_gray_to_rgb(image: Image.Image) -> torch.Tensor:
    values = np.asarray(image).astype(np.int64)
    gray = torch.from_numpy(np.clip(values >> 8, 0, 255).astype(np.uint8))  # keep the 8 high bits
    return gray.unsqueeze(0).expand(3, -1, -1).contiguous()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1][:200]


def resize_and_crop(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, S, S): shorter side to resize_size, center crop S."""
    _, height, width = pixels.shape
    if height == width == prep.input_size:
        return pixels
    if min(height, width) != prep.resize_size:
        pixels = TF.resize(pixels, [prep.resize_size], antialias=True)
    return TF.center_crop(pixels, [prep.input_size, prep.input_size])


def load_image(data: bytes, prep: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, S, S) ready to batch. The serving and ImageFolder path."""
    return resize_and_crop(decode_image(data, limits), prep)


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
