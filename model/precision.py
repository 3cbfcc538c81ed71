"""Which number format the model computes in, per device, and whether it is safe.

`PRECISION=auto` (the default) picks bf16 where the hardware computes it
natively, fp32 elsewhere:
  - CUDA GPUs that support bf16 (Ampere and newer);
  - CPUs with AVX-512 BF16 or AMX-BF16 instructions, read from the flags the
    kernel reports (/proc/cpuinfo), not guessed from the vendor. Elsewhere
    torch emulates bf16 on a CPU, slower than fp32.
On CPUs the weights and inputs themselves are bf16 (not autocast, which
converts at every layer and measured 2.6x slower than fp32 at batch 1).
fp16 is offered on GPUs only, and never chosen by `auto`: its 5-bit exponent
overflows where bf16's does not. (On a CPU with AVX-512 FP16 but no AMX-FP16,
torch's fp16 AlexNet ran slower than fp32 here: 148 against 202 images/s.)

The guard: a reduced precision must agree with fp32 on real images. Training
records top-1 agreement and the largest probability difference on its test
split in the checkpoint (`training.precision_agreement`), and `auto` refuses a
precision recorded below MIN_TOP1_AGREEMENT. `python -m training evaluate`
prints the same figures for any checkpoint and dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MIN_TOP1_AGREEMENT = 0.995
# Deprecated AUTOCAST values (GPU-only autocast before PRECISION existed), mapped to PRECISION.
AUTOCAST_TO_PRECISION = {"bf16": "auto", "fp16": "fp16", "off": "fp32"}


class PrecisionError(ValueError):
    """A precision that cannot run on this device."""


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    requested: str  # what the setting said (auto, or a forced name)
    reason: str  # why this one, for /model and the start-up line

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "requested": self.requested,
                "reason": self.reason}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the Linux kernel reports for this CPU (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_precisions(device: torch.device) -> list[str]:
    """Reduced precisions this device computes in hardware, best first."""
    if device.type == "cuda":
        found = ["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else []
        return found + ["fp16"]
    return ["bf16"] if {"avx512_bf16", "amx_bf16"} & cpu_flags() else []


def resolve(requested: str, device: torch.device, agreement: dict | None = None) -> Precision:
    """The precision to serve in. `agreement`: the checkpoint's recorded figures per precision name."""
    requested = (requested or "auto").lower()
    native = native_precisions(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if requested in ("fp32", "bf16", "fp16"):
        if requested == "fp16" and "fp16" not in native:
            raise PrecisionError("PRECISION=fp16 is for GPUs; on a CPU use bf16 or fp32")
        return Precision(requested, requested, "forced by PRECISION")
    if requested != "auto":
        raise PrecisionError(f"PRECISION must be auto, fp32, bf16 or fp16, not {requested!r}")
    if "bf16" not in native:
        return Precision("fp32", "auto", f"{where} has no native bf16")
    recorded = (agreement or {}).get("bf16")
    if recorded is not None and recorded["top1_agreement"] < MIN_TOP1_AGREEMENT:
        return Precision("fp32", "auto", f"bf16 agreed with fp32 on only {recorded['top1_agreement']:.2%} of the "
                                         f"test images (needs {MIN_TOP1_AGREEMENT:.1%})")
    checked = f"; agrees with fp32 on {recorded['top1_agreement']:.2%} of test images" if recorded else ""
    return Precision("bf16", "auto", f"{where} computes bf16 natively{checked}")


@torch.inference_mode()
def agreement(reference: torch.nn.Module, candidate: torch.nn.Module, batches) -> dict:
    """How a reduced-precision model's predictions compare with fp32 on the same inputs.

    `batches` yields (reference_input, candidate_input) pairs of the same images.
    Returns top-1 agreement (fraction of images with the same top class) and the
    largest absolute difference of any class probability."""
    same = total = 0
    max_difference = 0.0
    for reference_input, candidate_input in batches:
        expected = reference(reference_input).float().softmax(dim=1)
        got = candidate(candidate_input).float().softmax(dim=1)
        same += int((expected.argmax(dim=1) == got.argmax(dim=1)).sum())
        total += len(expected)
        max_difference = max(max_difference, float((expected - got).abs().max()))
    return {"images": total, "top1_agreement": same / max(1, total), "max_probability_difference": max_difference}
