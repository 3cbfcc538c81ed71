"""The training recipe: run config, optimizer, LR schedule, augmentation.

The LR schedule is a pure function of progress in [0, 1] -- the fraction of
steps done, or of the time budget spent -- so `--time-budget` fits warm-up and
cosine decay to wall-clock time, and a resumed run needs only its counters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class RunConfig:
    data: str = "shapes"
    preset: str = "small"
    out: str = "runs/small"
    epochs: int = 8
    time_budget: float | None = None  # seconds; replaces --epochs as the stopping rule
    batch_size: int = 128  # per process
    lr: float = 0.1  # peak, for the global batch; SGD + nesterov
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    cutout: float = 0.0  # side of a gray square erased at random from each training image, as a fraction of it
    ema: float = 0.0  # the decay of an exponential moving average of the weights, evaluated and saved (0: none)
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) mixing weight (0: none)
    warmup: float = 0.05  # fraction of the run spent ramping the LR up
    seed: int = 0
    shapes_per_class: int = 800
    amp: bool = True  # bf16 autocast where the device computes bf16 natively (GPU; CPU with AVX-512 BF16/AMX)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0, over progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    decay = (progress - warmup) / max(1e-8, 1.0 - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * decay))


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm scales: it only fights the normalization.
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


def augment(batch: torch.Tensor, generator: torch.Generator, cutout: float = 0.0) -> torch.Tensor:
    """Random crop after zero padding (shifts of up to 1/8 of the side) and
    horizontal flip, on a uint8 (N, 3, S, S) batch; with `cutout`, a gray square
    of that fraction of the side erased at a random place (it may overhang the edge).

    Shifting teaches translation invariance beyond what pooling gives; the
    flip is label-preserving for natural photos and for every shapes class.
    Cutout (DeVries & Taylor 2017) hides part of the object, so the network
    cannot lean on one telltale patch: it regularizes small datasets that
    many epochs would otherwise overfit.
    """
    n, _, size, _ = batch.shape
    pad = max(1, size // 8)
    padded = nn.functional.pad(batch, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(batch)
    for i in range(n):
        y, x = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, y : y + size, x : x + size]
        out[i] = crop.flip(-1) if flips[i] else crop
    if cutout > 0:
        side = max(1, round(cutout * size))
        centers = torch.randint(0, size, (n, 2), generator=generator)
        rows = torch.arange(size)
        inside_y = (rows[None, :] - centers[:, :1]).abs() <= side // 2  # (N, S)
        inside_x = (rows[None, :] - centers[:, 1:]).abs() <= side // 2
        erased = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (N, 1, S, S)
        out = out.masked_fill(erased, 128)
    return out


def weight_average(net: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of `net`'s weights (and buffers: BatchNorm's statistics), updated after
    each step; None for `decay` 0. Late in a run SGD's weights jitter around a minimum; their average lies
    nearer its middle and usually tests better than the last step's. The decay starts low and rises to
    `decay` ((1 + t) / (10 + t) at step t, as TensorFlow's ExponentialMovingAverage does), so a short run's
    average is not held back by its random initialization."""
    if decay <= 0:
        return None

    def average(averaged: torch.Tensor, current: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1.0 + float(steps)) / (10.0 + float(steps)))
        return averaged * rate + current * (1.0 - rate)

    return torch.optim.swa_utils.AveragedModel(net, avg_fn=average, use_buffers=True)


def mixed(inputs: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator):
    """Mixup (Zhang et al. 2018): each image blended with another of the batch, weight lam ~ Beta(alpha,
    alpha) for the whole batch; the loss is blended the same way (`mixed_loss`). The network then sees
    points between the training images, not only on them: a regularizer for small datasets."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(labels), generator=generator)
    return lam * inputs + (1 - lam) * inputs[order], labels[order], lam


def mixed_loss(criterion, logits: torch.Tensor, labels: torch.Tensor, others: torch.Tensor, lam: float):
    return lam * criterion(logits, labels) + (1 - lam) * criterion(logits, others)
