"""Request images -> uint8 pixel batches, off the event loop.

Each image decodes in a worker thread (libjpeg-turbo, libpng and friends
release the GIL, so images of one request decode in parallel), straight to
about the model's input size (model.preprocess). The first bad image, by
position, refuses the whole request with its reason (413 for too many bytes,
422 otherwise).

On a GPU (GPU_DECODE=auto where this process sees CUDA) the JPEGs of a
request decode together on the GPU with nvJPEG (torchvision.io.decode_jpeg),
are resized and cropped there, and come back as the same uint8 crops; other
formats, CMYK JPEGs and anything nvJPEG refuses take the CPU path. The
headers are still read and checked on the CPU first, so the limits hold.
"""

from __future__ import annotations

import os
import time

import anyio
import numpy as np
import torch

from model.config import Preprocessing
from model.preprocess import DecodeLimits, ImageRejected, load_pixels, open_header
from service.core.refusals import Refusal


def refusal_for(err: ImageRejected, index: int, count: int) -> Refusal:
    status = 413 if err.reason == "too_many_bytes" else 422
    where = f"image {index}: " if count > 1 else ""
    return Refusal(status, err.reason, f"{where}{err}")


class Decoder:
    def __init__(self, prep: Preprocessing, limits: DecodeLimits, gpu: torch.device | None = None):
        self.prep = prep
        self.limits = limits
        self.gpu = gpu
        self._slots = anyio.CapacityLimiter(max(2, os.cpu_count() or 1))

    async def decode(self, payloads: list[bytes], timer) -> np.ndarray:
        """uint8 (k, S, S, 3) for k encoded images; raises Refusal for the first bad one.
        `timer`: a Prometheus histogram that gets each image's decode seconds."""
        if self.gpu is not None:
            done = await anyio.to_thread.run_sync(self._decode_jpegs_on_gpu, payloads, timer, limiter=self._slots)
        else:
            done = [None] * len(payloads)
        refusals: dict[int, Refusal] = {}

        async def decode_one(index: int, data: bytes) -> None:
            start = time.perf_counter()
            try:
                done[index] = await anyio.to_thread.run_sync(load_pixels, data, self.prep, self.limits,
                                                             limiter=self._slots)
            except ImageRejected as err:
                refusals[index] = refusal_for(err, index, len(payloads))
                return
            timer.observe(time.perf_counter() - start)

        if len(payloads) == 1 and done[0] is None:  # the common case: no task group for one image
            await decode_one(0, payloads[0])
        else:
            async with anyio.create_task_group() as group:
                for index, data in enumerate(payloads):
                    if done[index] is None:
                        group.start_soon(decode_one, index, data)
        if refusals:
            raise refusals[min(refusals)]
        return np.stack(done)

    def _decode_jpegs_on_gpu(self, payloads: list[bytes], timer) -> list[np.ndarray | None]:
        """The RGB JPEGs among `payloads` decoded, resized and cropped on the GPU; None where the CPU must."""
        from torchvision.io import ImageReadMode, decode_jpeg

        from model.preprocess import resize_and_crop

        out: list[np.ndarray | None] = [None] * len(payloads)
        chosen = []
        for index, data in enumerate(payloads):
            try:
                header = open_header(data, self.limits)
            except ImageRejected:
                continue  # the CPU path refuses it with the reason
            if header.format == "JPEG" and header.mode in ("RGB", "L"):
                chosen.append(index)
        if not chosen:
            return out
        start = time.perf_counter()
        encoded = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in chosen]
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.gpu, apply_exif_orientation=True)
        except RuntimeError:
            return out  # one bad JPEG fails the batch: let the CPU decode each and find it
        for index, image in zip(chosen, images):  # float for the resize: CUDA has no uint8 antialiasing kernel
            crop = resize_and_crop(image.float(), self.prep).round_().clamp_(0, 255).to(torch.uint8)
            out[index] = crop.permute(1, 2, 0).contiguous().cpu().numpy()
        seconds = (time.perf_counter() - start) / len(chosen)
        for _ in chosen:
            timer.observe(seconds)
        return out


def decode_seconds_per_byte(prep: Preprocessing, limits: DecodeLimits) -> float:
    """What decoding costs per encoded byte on this machine, measured once at start-up on a 640x480
    q90 JPEG of a smooth gradient with noise (photo-like entropy): admission control converts a
    request's bytes into forward-pass equivalents with it (service.runtime.admission)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1)
    photo = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        load_pixels(data, prep, limits)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / len(data)
