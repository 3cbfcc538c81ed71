"""What a client does to send pixels instead of encoded images: the Open Inference Protocol's
UINT8 input `pixels` [N, S, S, 3] skips decoding and resizing on the server.

The exact preprocessing, the one the server applies to encoded images (model.preprocess),
with `resize_size` and `input_size` S from the model's metadata (GET /v2/models/<name>,
`parameters`, or GET /model's `preprocessing`):
  1. decode to 8-bit RGB, EXIF orientation applied (alpha dropped, grayscale repeated);
  2. resize so the shorter side is `resize_size` (the longer one to int(resize_size * long /
     short)): bilinear, antialiased (torchvision's resize with antialias=True; PIL's BILINEAR
     resize agrees with it to about a grey level); an image already S x S is left as it is;
  3. center-crop S x S (torchvision's center_crop: the top-left corner at
     int(round((H - S) / 2)), int(round((W - S) / 2)));
  4. keep uint8, height x width x RGB (channels-last), and stack the images: [N, S, S, 3].
No scaling to [0, 1] and no mean/std normalization: the server does that, folded into the
first conv. Encoded bytes go through the server's own path (model.preprocess.load_pixels,
which decodes JPEGs at a reduced DCT scale first), so pixels made here from the same file
equal the server's to the last bit; other decoders may differ by a grey level or so.

In model/ beside model.preprocess, not in service/: it is preprocessing, it must stay the one
definition training and serving use, and a client needs none of the service to run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.config import Preprocessing
from model.preprocess import DecodeLimits, load_pixels, resize_and_crop

# A client decodes its own files: no need for the server's guard against decompression bombs.
CLIENT_LIMITS = DecodeLimits(max_bytes=1 << 40, max_pixels=1 << 40)


def client_pixels(images, resize_size: int, input_size: int) -> np.ndarray:
    """The UINT8 [N, S, S, 3] tensor for the OIP `pixels` input, from images given as encoded
    bytes, file paths, PIL images or uint8 H x W x 3 RGB arrays."""
    prep = Preprocessing(input_size=input_size, resize_size=resize_size)
    return np.stack([_one(image, prep) for image in images])


def _one(image, prep: Preprocessing) -> np.ndarray:
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_pixels(bytes(image), prep, CLIENT_LIMITS)
    if hasattr(image, "convert"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an array image must be uint8 H x W x 3 RGB, not {array.dtype} {array.shape}")
    chw = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy: PIL's arrays are read-only
    return np.ascontiguousarray(resize_and_crop(chw, prep).permute(1, 2, 0).numpy())
