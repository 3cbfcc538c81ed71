"""The run's state: what the training loop shares (`Run`), and what of it survives a resume,
kept beside the checkpoint as `train_state.pt`.

The file holds only tensors, numbers, strings, lists and dicts, so loading it with
`torch.load(weights_only=True)` -- which refuses arbitrary pickled objects --
restores everything: model and optimizer state, counters, RNG state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from model.atomic import atomic_write_bytes
from model.network import AlexNet
from model.preprocess import Normalizer
from training import distributed
from training.data import Dataset
from training.recipe import RunConfig

STATE_FILE = "train_state.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(directory) / STATE_FILE, buffer.getvalue())


def load_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class Progress:
    """Counters that survive a resume."""

    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0  # seconds of training so far, across resumes
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


@dataclass
class Run:
    """Everything the loop shares, built once by `setup_run`: what torchvision's reference passes
    to `train_one_epoch(model, criterion, optimizer, data_loader, device, epoch, args)` one by one.

    There is no LR scheduler object and no GradScaler: the LR is a pure function of
    `fraction_done()` (training.recipe), and bf16 keeps fp32's exponent range, so its gradients
    need no loss scaling."""

    config: RunConfig
    ctx: distributed.Context
    out: Path  # the directory asked for; on resume, `config` is the saved run's
    dataset: Dataset
    net: AlexNet  # the bare network: evaluated and saved
    model: nn.Module  # what the steps run: `net`, or DDP around it
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    normalizer: Normalizer
    sampler: DistributedSampler
    augment_rng: torch.Generator
    autocast_dtype: torch.dtype | None  # bf16 where the device computes it natively, else None (fp32)
    total_steps: int
    progress: Progress
    ema: nn.Module | None = None  # the moving average of the weights (recipe.weight_average), evaluated and saved
    eval_seconds: float | None = None  # what the last evaluation took (trainer.evaluation_due)
    last_evaluated: int = 0  # the epoch it followed

    def fraction_done(self) -> float:
        """Progress in [0, 1]: of the time budget spent, or of the steps taken."""
        if self.config.time_budget:
            return self.progress.elapsed / self.config.time_budget
        return self.progress.step / max(1, self.total_steps)

    def sync_clock(self) -> None:
        """Under a time budget every rank takes the slowest rank's clock, so all stop at the same step."""
        if self.config.time_budget:
            self.progress.elapsed = distributed.max_across_ranks(self.progress.elapsed, self.ctx)


def resume_point(config: RunConfig, ctx: distributed.Context, resume: bool) -> tuple[RunConfig, Progress, dict | None]:
    """The run to continue: its saved config, counters and state; or `config` from the start."""
    out = Path(config.out)
    state = load_state(out) if resume else None
    if state is None:
        if resume and ctx.is_main:
            print(f"no {out}/train_state.pt to resume from; starting a new run")
        return config, Progress(), None
    progress = Progress(**state["progress"])
    if ctx.is_main:
        print(f"resuming {out} at epoch {progress.epoch + 1}, step {progress.step}, {progress.elapsed:.0f}s in")
    return RunConfig.from_dict(state["run_config"]), progress, state


def save_training_state(run: Run) -> None:
    """Write train_state.pt: everything a resumed run needs to continue as if never stopped."""
    ctx = run.ctx
    rng_states = [run.augment_rng.get_state()]
    if ctx.distributed:
        # Every rank's augmentation generator, so each resumes its own stream. Tensors, not
        # all_gather_object: that one pickles.
        local = rng_states[0].to(ctx.device)
        gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(gathered, local)
        rng_states = [g.cpu() for g in gathered]
    if ctx.is_main:
        save_state(run.out, {
            "run_config": run.config.to_dict(),
            "progress": run.progress.__dict__.copy(),
            "model": run.net.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else {},
            "optimizer": run.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "augment_rng": rng_states,
        })
    distributed.barrier(ctx)
