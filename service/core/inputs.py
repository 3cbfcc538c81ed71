"""Request inputs: images as uploaded files or base64 strings, to raw bytes.

The endpoints take either form; refusals here are the client's mistakes
(400), or too much at once (413).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from service.core.refusals import Refusal


def collect_payloads(files: list | None, encoded: list[str] | None, plural: bool, max_images: int = 1) -> list[bytes]:
    """The encoded image bytes of a request: from `images`/`image` (multipart
    files) or `images_base64`/`image_base64` (JSON), never both."""
    field, field_b64 = ("images", "images_base64") if plural else ("image", "image_base64")
    if files and encoded:
        raise Refusal(400, "ambiguous_input", f"send `{field}` or `{field_b64}`, not both")
    payloads: list[bytes] = []
    if files:
        payloads = [Path(f).read_bytes() for f in files]
    elif encoded:
        for index, text in enumerate(encoded):
            payloads.append(b64decode(text, f"{field_b64}[{index}]" if plural else field_b64))
    if not payloads:
        raise Refusal(400, "no_image", f"no image given: send `{field}` (multipart) or `{field_b64}` (JSON)")
    if len(payloads) > max_images:
        raise Refusal(413, "too_many_images", f"{len(payloads)} images in one request; the limit is {max_images}")
    return payloads


def b64decode(text: str, field: str) -> bytes:
    if text.startswith("data:") and "," in text:  # accept data URLs as browsers make them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(400, "invalid_base64", f"`{field}` is not valid base64") from None
