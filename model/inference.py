"""Inference on a loaded checkpoint: device, precision, batched forward.

The service calls this; it knows nothing of HTTP. Two copies of the network:
  - `model`: the serving network (model.optimize): normalization and
    BatchNorm folded into the convs, in the serving precision (bf16 where the
    hardware computes it natively; model.precision), channels-last. Batched
    predictions and feature maps come from it.
  - `reference`: the network as trained, fp32. The attribution methods
    (Grad-CAM among them, model.attribution) use it: they need exact gradients more than speed.
    The class and probability they report are still the serving copy's (the
    same answer /classify gives for the image): only the map comes from the
    reference, computed for that class.
Every result leaves as float32 on the CPU, whatever the precision inside.

A semaphore bounds how many forward passes run at once (`parallel`, default
1): on a GPU one at a time keeps the stream busy without contention; on a
CPU, torch already spreads one forward over every core.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass

import torch

from model import precision as precisions
from model.attribution import Attribution, AttributionRequest, attribute
from model.checkpoint import Checkpoint
from model.network import STAGES, mean_over_mirrors, with_mirror_images
from model.optimize import inference_model
from model.preprocess import Normalizer


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available, unless DEVICE says otherwise."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda was requested but no CUDA device is available")
    return torch.device(requested)


@dataclass
class BatchOutput:
    probabilities: torch.Tensor  # (N, classes) float32, on CPU
    embeddings: torch.Tensor  # (N, D) float32, penultimate layer after ReLU, on CPU
    forward_seconds: float


class Predictor:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, precision: str = "auto", parallel: int = 1,
                 full_batch: int = 32):
        self.manifest = checkpoint.manifest
        self.device = device
        recorded = self.manifest.training.get("precision_agreement")
        self.precision = precisions.resolve(precision, device, recorded)
        self.reference = checkpoint.model.to(device).eval()
        self.model = inference_model(checkpoint.model, self.manifest.preprocessing, self.precision.dtype, device,
                                     full_batch=full_batch)
        self.normalizer = Normalizer(self.manifest.preprocessing)
        self.input_size = self.manifest.preprocessing.input_size
        self._lock = threading.BoundedSemaphore(parallel)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def dtype_name(self) -> str:
        return str(self.precision.dtype).removeprefix("torch.")

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> raw pixel values in the serving dtype on the device, channels-last.

        A batch stacked from HWC images is channels-last already, and the conversion keeps that."""
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)  # uint8: 4x less to copy than fp32
        return images.to(self.precision.dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> BatchOutput:
        """Class probabilities and penultimate-layer embeddings in one forward pass (of the images and
        their mirror images, averaged, for a model with `test_time_flip`)."""
        model = self.model
        flip = model.config.test_time_flip
        with self._lock:
            start = time.perf_counter()
            pixels = self._pixels(images)
            outputs = model.extract(
                with_mirror_images(pixels) if flip else pixels,
                {model.embedding_layer: "post_relu", model.logits_layer: "post_relu"},
            )
            logits, embeddings = outputs[model.logits_layer].float(), outputs[model.embedding_layer].float()
            if flip:
                logits, embeddings = mean_over_mirrors(logits), mean_over_mirrors(embeddings)
            probabilities = logits.softmax(dim=1).cpu()
            embeddings = embeddings.cpu()  # .cpu() waits for the GPU
            seconds = time.perf_counter() - start
        return BatchOutput(probabilities, embeddings, seconds)

    @torch.inference_mode()
    def activations(self, image: torch.Tensor, layers: list[str], stage: str) -> dict[str, torch.Tensor]:
        """Activations (C, H, W) or (D,) of one uint8 (3, S, S) image at the named layers, float32 on CPU."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}")
        self.model.check_layers(layers)
        with self._lock:
            found = self.model.extract(self._pixels(image.unsqueeze(0)), {name: stage for name in layers})
        return {name: found[name][0].float().cpu() for name in layers}

    def normalized(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 (3, S, S) image as the reference network's fp32 input (1, 3, S, S) on the device."""
        return self.normalizer(image.unsqueeze(0).to(self.device)).contiguous(memory_format=torch.channels_last)

    def served_answer(self, image: torch.Tensor, class_index: int | None = None) -> tuple[int, float]:
        """(class, probability) of one uint8 (3, S, S) image as the serving copy answers it: the top
        class, or `class_index` -- the same numbers /classify gives, in the serving precision."""
        probabilities = self.predict(image.unsqueeze(0)).probabilities[0]
        target = int(probabilities.argmax()) if class_index is None else class_index
        return target, float(probabilities[target])

    def explain(self, image: torch.Tensor, request: AttributionRequest) -> Attribution:
        """An attribution map of one uint8 (3, S, S) image (model.attribution; fp32 reference), for
        the served answer's class; class and probability are the served answer's."""
        request = request.resolved(self.reference)
        target, probability = self.served_answer(image, request.class_index)
        with self._lock:
            found = attribute(self.reference, self.normalized(image), dataclasses.replace(request, class_index=target))
        return dataclasses.replace(found, probability=probability)

    def kernels(self, layer: str) -> torch.Tensor:
        """A conv layer's weights as learned (out, in, k, k), float32 on CPU (the serving copy is folded)."""
        self.reference.check_conv_layer(layer)
        return self.reference.get_submodule(layer).weight.detach().float().cpu()

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run a few forwards so the first real request does not pay for lazy
        initialization (allocator, cuDNN autotuning, thread pools, compiling
        the LRN). Returns seconds."""
        start = time.perf_counter()
        for size in batch_sizes:
            for _ in range(2):
                self.predict(torch.zeros(size, 3, self.input_size, self.input_size, dtype=torch.uint8))
        return time.perf_counter() - start

    def gpu_memory(self) -> tuple[int, int, int] | None:
        """(allocated, reserved, total) bytes on the GPU; None on a CPU."""
        if self.device.type != "cuda":
            return None
        total = torch.cuda.get_device_properties(self.device).total_memory
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device), total


class NullPredictor(Predictor):
    """A model that costs nothing, for measuring the frontend alone (NULL_MODEL=1; the habit
    of Triton's identity backend): uniform probabilities, zero embeddings, no forward pass."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, precision: str = "auto", parallel: int = 1,
                 full_batch: int = 32):
        self.manifest = checkpoint.manifest
        self.device = torch.device("cpu")
        self.precision = precisions.Precision("fp32", precision, "null model: nothing is computed")
        self.reference = self.model = checkpoint.model
        self.normalizer = Normalizer(self.manifest.preprocessing)
        self.input_size = self.manifest.preprocessing.input_size
        self._lock = threading.BoundedSemaphore(parallel)
        self._classes = checkpoint.model.config.num_classes
        self._dim = checkpoint.model.config.fc_widths[-1] if checkpoint.model.config.fc_widths else self._classes

    def predict(self, images: torch.Tensor) -> BatchOutput:
        n = len(images)
        return BatchOutput(torch.full((n, self._classes), 1.0 / self._classes), torch.zeros(n, self._dim), 1e-6)


def configure_cpu_threads(threads: int | None = None) -> int:
    """One worker process per machine by default, so torch may use every core."""
    threads = threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    configure_cpu_allocator()
    return threads


def configure_cpu_allocator() -> bool:
    """Keep freed activation memory in the process instead of handing it back to the OS.

    A 32-image AlexNet batch allocates maps of 10-20 MB at every layer. glibc's
    malloc serves blocks that large with fresh mmap()s and returns them on
    free(), so each forward pays a page fault per 4 KiB touched. Raising the
    mmap threshold to its maximum (32 MiB) and the trim threshold to 1 GiB
    makes freed blocks reusable: 5-10% faster forwards here (BENCHMARKS.md),
    for a resident size that stays at its peak. No-op off glibc."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt() parameters, from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(mallopt(m_trim_threshold, 1 << 30))
