"""Inference on a loaded checkpoint: device placement, precision, batched forward.

The service calls this; it knows nothing of HTTP. A semaphore bounds how many
forward passes run at once (`parallel`, default 1): on a GPU one at a time
keeps the stream busy without contention; on a CPU, independent
single-threaded forwards can beat one multi-threaded forward.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from model.checkpoint import Checkpoint
from model.gradcam import ClassActivationMap, grad_cam
from model.network import STAGES
from model.preprocess import Normalizer

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


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
    def __init__(self, checkpoint: Checkpoint, device: torch.device, autocast: str = "bf16", parallel: int = 1):
        self.manifest = checkpoint.manifest
        self.device = device
        self.model = checkpoint.model.to(device, memory_format=torch.channels_last).eval()
        # Mixed precision pays off on GPUs; on CPUs fp32 is both faster and exact.
        self.autocast_dtype = AUTOCAST_DTYPES[autocast] if device.type == "cuda" else None
        self.normalizer = Normalizer(self.manifest.preprocessing)
        self.input_size = self.manifest.preprocessing.input_size
        self._lock = threading.BoundedSemaphore(parallel)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def dtype_name(self) -> str:
        return {torch.bfloat16: "bfloat16", torch.float16: "float16", None: "float32"}[self.autocast_dtype]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) on CPU -> normalized float batch on the device."""
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        return self.normalizer(images).contiguous(memory_format=torch.channels_last)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> BatchOutput:
        """Class probabilities and penultimate-layer embeddings in one forward pass."""
        model = self.model
        with self._lock:
            start = time.perf_counter()
            with self._autocast():
                outputs = model.extract(
                    self._prepare(images), {model.embedding_layer: "post_relu", model.logits_layer: "post_relu"}
                )
            probabilities = outputs[model.logits_layer].float().softmax(dim=1).cpu()
            embeddings = outputs[model.embedding_layer].float().cpu()  # .cpu() waits for the GPU
            seconds = time.perf_counter() - start
        return BatchOutput(probabilities, embeddings, seconds)

    @torch.inference_mode()
    def activations(self, image: torch.Tensor, layers: list[str], stage: str) -> dict[str, torch.Tensor]:
        """Activations (C, H, W) or (D,) of one uint8 (3, S, S) image at the named layers, float32 on CPU."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}")
        with self._lock, self._autocast():
            found = self.model.extract(self._prepare(image.unsqueeze(0)), {name: stage for name in layers})
        return {name: found[name][0].float().cpu() for name in layers}

    def grad_cam(self, image: torch.Tensor, layer: str, class_index: int | None = None) -> ClassActivationMap:
        """Grad-CAM of one uint8 (3, S, S) image at a conv layer (fp32, with gradients; see model.gradcam)."""
        if class_index is not None and not 0 <= class_index < self.model.config.num_classes:
            raise IndexError(f"class_index must be in 0..{self.model.config.num_classes - 1}")
        with self._lock:
            return grad_cam(self.model, self._prepare(image.unsqueeze(0)), layer, class_index)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run a few forwards so the first real request does not pay for lazy
        initialization (allocator, cuDNN autotuning, thread pools). Returns seconds."""
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


def configure_cpu_threads(threads: int | None = None) -> int:
    """One worker process per machine by default, so torch may use every core."""
    threads = threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads
