"""The training loop: one readable function per job, torchrun-aware.

Per step: slice a batch of uint8 images, augment, normalize (the service's
Normalizer), forward in channels_last (bf16 autocast where the device computes
bf16 natively: GPUs, and CPUs with AVX-512 BF16 or AMX), label-smoothed
cross-entropy, SGD step with the LR the schedule gives for this much progress.
Per epoch: evaluate on the test split, append a JSON line to train_log.jsonl,
write the best checkpoint (atomically) and the resumable train_state.pt.
At the end: record how the best checkpoint's reduced-precision serving
network agrees with fp32 on the test split (the service's PRECISION=auto
reads it; model.precision).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from model.checkpoint import Manifest, load_checkpoint, save_checkpoint, write_manifest
from model.config import get_preset
from model.network import AlexNet
from model.precision import native_precisions
from model.preprocess import Normalizer
from training import distributed
from training.data import Dataset, load_dataset
from training.evaluate import evaluate, format_agreement, precision_agreement
from training.recipe import RunConfig, augment, lr_factor, make_optimizer
from training.state import load_state, save_state

LOG_FILE = "train_log.jsonl"


class OutputDirError(RuntimeError):
    pass


@dataclass
class Progress:
    """Counters that survive a resume."""

    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0  # seconds of training so far, across resumes
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


def check_output_dir(out: Path) -> None:
    """Fail before any training if the checkpoint could not be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"\0" * 65536)  # a full disk fails here, not after an hour of training
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"cannot write checkpoints to {out}: {err.strerror or err}") from None


def _sampler(size: int, ctx: distributed.Context, seed: int) -> DistributedSampler:
    # drop_last keeps every rank at the same number of steps, which DDP needs.
    return DistributedSampler(
        range(size), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=ctx.distributed
    )


def train(config: RunConfig, resume: bool = False) -> Manifest | None:
    """Train; returns the best checkpoint's manifest on rank 0 (None on others)."""
    ctx = distributed.setup()
    out = Path(config.out)
    if ctx.is_main:
        check_output_dir(out)
    progress = Progress()
    state = load_state(out) if resume else None
    if state is not None:
        config = RunConfig.from_dict(state["run_config"])
        progress = Progress(**state["progress"])
        if ctx.is_main:
            print(f"resuming {out} at epoch {progress.epoch + 1}, step {progress.step}, {progress.elapsed:.0f}s in")
    elif resume and ctx.is_main:
        print(f"no {out}/train_state.pt to resume from; starting a new run")

    torch.manual_seed(config.seed)
    preset = get_preset(config.preset)
    dataset = load_dataset(
        config.data, preset.preprocessing, config.seed, config.shapes_per_class, show_progress=ctx.is_main
    )
    net = AlexNet(preset.config.with_classes(len(dataset.class_names)))
    net = net.to(ctx.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(net, config)
    augment_rng = torch.Generator().manual_seed(config.seed + 1000 * ctx.rank)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        augment_rng.set_state(state["augment_rng"][ctx.rank % len(state["augment_rng"])])
    model: nn.Module = DistributedDataParallel(net) if ctx.distributed else net

    normalizer = Normalizer(preset.preprocessing)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    use_amp = config.amp and "bf16" in native_precisions(ctx.device)
    autocast_dtype = torch.bfloat16 if use_amp else None
    sampler = _sampler(len(dataset.train.labels), ctx, config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    def run_progress() -> float:
        if config.time_budget:
            return progress.elapsed / config.time_budget
        return progress.step / max(1, total_steps)

    if ctx.is_main:
        budget = f"{config.time_budget:.0f}s budget" if config.time_budget else f"{config.epochs} epochs"
        print(
            f"training {config.preset} on {dataset.name}: {len(dataset.train.labels)} train / "
            f"{len(dataset.test.labels)} test images, {len(dataset.class_names)} classes, {budget}, "
            f"{ctx.world_size} process(es) on {ctx.device}{', bf16 autocast' if use_amp else ''}"
        )

    manifest = None
    while run_progress() < 1.0:
        sampler.set_epoch(progress.epoch)
        order = torch.tensor(list(sampler), dtype=torch.int64)
        model.train()
        stats = _train_one_epoch(
            model, optimizer, criterion, normalizer, dataset, order, config, ctx, progress,
            run_progress, autocast_dtype, augment_rng,
        )
        progress.epoch += 1
        manifest = _end_of_epoch(net, dataset, normalizer, config, ctx, progress, stats) or manifest
        _save_training_state(out, net, optimizer, config, ctx, progress, augment_rng)

    if ctx.is_main and progress.best_epoch >= 0:
        print(
            f"best test top-1 {progress.best_top1:.4f} at epoch {progress.best_epoch}; "
            f"{progress.elapsed:.1f}s of training; checkpoint in {out}"
        )
        manifest = record_precision_agreement(out, dataset, ctx.device)
    distributed.teardown()
    return manifest if ctx.is_main else None


def _train_one_epoch(
    model, optimizer, criterion, normalizer, dataset: Dataset, order, config: RunConfig,
    ctx: distributed.Context, progress: Progress, run_progress, autocast_dtype, augment_rng,
) -> dict:
    batches = order.split(config.batch_size)
    bar = tqdm(
        batches, desc=f"epoch {progress.epoch + 1}", unit="batch",
        disable=None if ctx.is_main else True,  # None: a bar on terminals, none in logs
        leave=True, dynamic_ncols=True, mininterval=0.5,
    )
    loss_sum, correct, seen = 0.0, 0, 0
    epoch_start = time.perf_counter()
    for batch_indices in bar:
        step_start = time.perf_counter()
        if run_progress() >= 1.0:
            break
        lr = config.lr * lr_factor(run_progress(), config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = augment(dataset.train.images[batch_indices], augment_rng)
        images = images.to(ctx.device, non_blocking=True)
        labels = dataset.train.labels[batch_indices].to(ctx.device, non_blocking=True)
        inputs = normalizer(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        progress.step += 1
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        progress.elapsed += time.perf_counter() - step_start
        if config.time_budget:
            progress.elapsed = distributed.max_across_ranks(progress.elapsed, ctx)
        rate = seen * ctx.world_size / max(1e-9, time.perf_counter() - epoch_start)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
    bar.close()
    seconds = time.perf_counter() - epoch_start
    return {
        "train_loss": loss_sum / max(1, seen),
        "train_top1": correct / max(1, seen),
        "images_per_sec": seen * ctx.world_size / max(1e-9, seconds),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _end_of_epoch(net, dataset, normalizer, config, ctx, progress, stats) -> Manifest | None:
    """Rank 0 evaluates, logs and keeps the best checkpoint; the others wait."""
    manifest = None
    if ctx.is_main:
        eval_start = time.perf_counter()
        # In fp32 even when the steps run under bf16 autocast: the accuracy of the weights as saved.
        result = evaluate(net, dataset.test, normalizer, len(dataset.class_names), ctx.device)
        record = {
            "epoch": progress.epoch, "step": progress.step, **stats,
            "test_loss": result.loss, "test_top1": result.top1, "test_top5": result.top5,
            "elapsed": round(progress.elapsed, 3),
        }
        progress.history.append(record)
        with open(Path(config.out) / LOG_FILE, "a") as log:
            log.write(json.dumps(record) + "\n")
        tqdm.write(
            f"epoch {progress.epoch}: train loss {stats['train_loss']:.3f} acc {stats['train_top1']:.3f} | "
            f"test loss {result.loss:.3f} top-1 {result.top1:.4f} top-5 {result.top5:.4f} | "
            f"{stats['images_per_sec']:.0f} img/s"
        )
        if result.top1 > progress.best_top1:
            progress.best_top1, progress.best_epoch = result.top1, progress.epoch
            manifest = save_checkpoint(
                config.out, net, dataset.class_names, get_preset(config.preset).preprocessing, config.preset,
                training=_training_summary(config, dataset, ctx, progress, result),
            )
        # Evaluation time counts against a time budget: it is wall-clock the user waits for.
        progress.elapsed += time.perf_counter() - eval_start
    if config.time_budget:
        progress.elapsed = distributed.max_across_ranks(progress.elapsed, ctx)
    distributed.barrier(ctx)
    return manifest


def record_precision_agreement(out: Path, dataset: Dataset, device: torch.device) -> Manifest:
    """Measure the best checkpoint in each reduced precision against fp32 on the test split, and
    keep the figures in its manifest (the weights, and so their hash, are untouched)."""
    checkpoint = load_checkpoint(out)
    figures = precision_agreement(checkpoint, dataset.test, device)
    print("precision check against fp32 on the test split:", *format_agreement(figures), sep="\n")
    manifest = checkpoint.manifest
    manifest.training["precision_agreement"] = figures
    write_manifest(out, manifest)
    return manifest


def _training_summary(config, dataset, ctx, progress, result) -> dict:
    return {
        "dataset": dataset.name,
        "data": config.data,
        "epochs": progress.epoch,
        "steps": progress.step,
        "best_epoch": progress.best_epoch,
        "seconds": round(progress.elapsed, 2),
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "train_images": len(dataset.train.labels),
        "test_images": len(dataset.test.labels),
        "skipped_files": len(dataset.skipped_files),
        "metrics": {"test_top1": result.top1, "test_top5": result.top5, "test_loss": result.loss},
        "per_class_top1": dict(zip(dataset.class_names, result.per_class_accuracy)),
        "history": list(progress.history),
        "run_config": config.to_dict(),
    }


def _save_training_state(out, net, optimizer, config, ctx, progress, augment_rng) -> None:
    rng_states = [augment_rng.get_state()]
    if ctx.distributed:
        # Tensors, not all_gather_object: that one pickles.
        local = rng_states[0].to(ctx.device)
        gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(gathered, local)
        rng_states = [g.cpu() for g in gathered]
    if ctx.is_main:
        save_state(out, {
            "run_config": config.to_dict(),
            "progress": progress.__dict__.copy(),
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "augment_rng": rng_states,
        })
    distributed.barrier(ctx)

