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
from training.evaluate import EvalResult, evaluate, format_agreement, precision_agreement
from training.recipe import RunConfig, augment, lr_factor, make_optimizer, mixed, mixed_loss, weight_average
from training.state import Run, resume_point, save_training_state

LOG_FILE = "train_log.jsonl"


class OutputDirError(RuntimeError):
    pass


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
    run = setup_run(config, ctx, resume)
    manifest = None
    while run.fraction_done() < 1.0:
        stats = train_one_epoch(run)
        run.progress.epoch += 1
        if run.fraction_done() >= 1.0 or evaluation_due(run, stats):
            manifest = end_of_epoch(run, stats) or manifest
        save_training_state(run)

    progress = run.progress
    if ctx.is_main and progress.best_epoch >= 0:
        print(
            f"best test top-1 {progress.best_top1:.4f} at epoch {progress.best_epoch}; "
            f"{progress.elapsed:.1f}s of training; checkpoint in {run.out}"
        )
        manifest = record_precision_agreement(run.out, run.dataset, ctx.device)
    distributed.teardown()
    return manifest if ctx.is_main else None


def setup_run(config: RunConfig, ctx: distributed.Context, resume: bool) -> Run:
    """Data, network, optimizer and counters, from `config` or from the saved state on resume."""
    out = Path(config.out)
    if ctx.is_main:
        check_output_dir(out)
    config, progress, state = resume_point(config, ctx, resume)

    # The order matters for reproducibility: the seed, then weight init draws from it; a resumed
    # run then overwrites the generator's state with the saved one.
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
    model = DistributedDataParallel(net) if ctx.distributed else net

    use_amp = config.amp and "bf16" in native_precisions(ctx.device)
    sampler = _sampler(len(dataset.train.labels), ctx, config.seed)
    run = Run(
        config=config, ctx=ctx, out=out, dataset=dataset, net=net, model=model, optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        normalizer=Normalizer(preset.preprocessing), sampler=sampler, augment_rng=augment_rng,
        autocast_dtype=torch.bfloat16 if use_amp else None,
        total_steps=config.epochs * math.ceil(len(sampler) / config.batch_size), progress=progress,
        ema=weight_average(net, config.ema),
    )
    if run.ema is not None and state is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    if ctx.is_main:
        _announce(run)
    return run


def _announce(run: Run) -> None:
    config, dataset, ctx = run.config, run.dataset, run.ctx
    budget = f"{config.time_budget:.0f}s budget" if config.time_budget else f"{config.epochs} epochs"
    print(
        f"training {config.preset} on {dataset.name}: {len(dataset.train.labels)} train / "
        f"{len(dataset.test.labels)} test images, {len(dataset.class_names)} classes, {budget}, "
        f"{ctx.world_size} process(es) on {ctx.device}{', bf16 autocast' if run.autocast_dtype is not None else ''}"
    )


def train_one_epoch(run: Run) -> dict:
    """One pass over this rank's share of the training set, cut short when the run is done;
    returns the epoch's training figures for the log."""
    run.sampler.set_epoch(run.progress.epoch)
    order = torch.tensor(list(run.sampler), dtype=torch.int64)
    run.model.train()
    bar = tqdm(
        order.split(run.config.batch_size), desc=f"epoch {run.progress.epoch + 1}", unit="batch",
        disable=None if run.ctx.is_main else True,  # None: a bar on terminals, none in logs
        leave=True, dynamic_ncols=True, mininterval=0.5,
    )
    loss_sum, correct, seen = 0.0, 0, 0
    epoch_start = time.perf_counter()
    for batch_indices in bar:
        step_start = time.perf_counter()
        if run.fraction_done() >= 1.0:
            break
        lr = run.config.lr * lr_factor(run.fraction_done(), run.config.warmup)
        loss, logits, labels = train_step(run, batch_indices, lr)

        run.progress.step += 1
        seen += len(labels)
        loss_sum += loss.item() * len(labels)  # .item() waits for the step: the step time below is real
        correct += (logits.argmax(1) == labels).sum().item()
        run.progress.elapsed += time.perf_counter() - step_start
        run.sync_clock()
        rate = seen * run.ctx.world_size / max(1e-9, time.perf_counter() - epoch_start)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
    bar.close()
    seconds = time.perf_counter() - epoch_start
    return {
        "epoch_seconds": round(seconds, 3),  # its training steps' wall-clock
        "train_loss": loss_sum / max(1, seen),
        "train_top1": correct / max(1, seen),
        "images_per_sec": seen * run.ctx.world_size / max(1e-9, seconds),
        "lr": run.optimizer.param_groups[0]["lr"],
    }


def train_step(run: Run, batch_indices: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on the batch at `batch_indices`; returns the loss, the logits and the labels."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    train = run.dataset.train
    images = augment(train.images[batch_indices], run.augment_rng, run.config.cutout)
    images = images.to(run.ctx.device, non_blocking=True)
    labels = train.labels[batch_indices].to(run.ctx.device, non_blocking=True)
    inputs = run.normalizer(images)
    others, lam = labels, 1.0
    if run.config.mixup > 0:
        inputs, others, lam = mixed(inputs, labels, run.config.mixup, run.augment_rng)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    dtype = run.autocast_dtype
    with torch.autocast(run.ctx.device.type, dtype=dtype, enabled=dtype is not None):
        logits = run.model(inputs)
        loss = mixed_loss(run.criterion, logits.float(), labels, others, lam)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update_parameters(run.net)
    return loss, logits, labels


EVALUATION_SHARE = 0.1  # under a time budget, the most of it evaluations may take


def evaluation_due(run: Run, stats: dict) -> bool:
    """Evaluate after this epoch? Always, without a time budget (every epoch is logged). Under one, the
    evaluations (the test split, the checkpoint written) come from the same seconds as the training: on
    a 2-core CPU one took 0.8 s beside an epoch's 3.6 s of training (the CIFAR-10 subset: 10,000
    training and 3,000 test images), so evaluating every epoch spent 18% of the budget not training.
    Then every k-th epoch, k such that evaluations take at most EVALUATION_SHARE of the time; the last
    epoch always."""
    if not run.config.time_budget or run.eval_seconds is None:
        return True
    every = math.ceil(run.eval_seconds / (EVALUATION_SHARE * max(1e-9, stats["epoch_seconds"])))
    return run.progress.epoch - run.last_evaluated >= every


def end_of_epoch(run: Run, stats: dict) -> Manifest | None:
    """Rank 0 evaluates, logs and keeps the best checkpoint; the others wait."""
    manifest = None
    if run.ctx.is_main:
        eval_start = time.perf_counter()
        # In fp32 even when the steps run under bf16 autocast: the accuracy of the weights as saved.
        net = run.ema.module if run.ema is not None else run.net  # the weights saved: the average, if kept
        result = evaluate(net, run.dataset.test, run.normalizer, len(run.dataset.class_names), run.ctx.device)
        _log_epoch(run, stats, result)
        if result.top1 > run.progress.best_top1:
            run.progress.best_top1, run.progress.best_epoch = result.top1, run.progress.epoch
            manifest = save_checkpoint(
                run.config.out, net, run.dataset.class_names, get_preset(run.config.preset).preprocessing,
                run.config.preset, training=_training_summary(run, result),
            )
        # Evaluation time counts against a time budget: it is wall-clock the user waits for.
        run.eval_seconds = time.perf_counter() - eval_start
        run.progress.elapsed += run.eval_seconds
    run.last_evaluated = run.progress.epoch
    run.sync_clock()
    distributed.barrier(run.ctx)
    return manifest


def _log_epoch(run: Run, stats: dict, result: EvalResult) -> None:
    """Append the epoch's figures to the history and to train_log.jsonl, and print them."""
    progress = run.progress
    record = {
        "epoch": progress.epoch, "step": progress.step, **stats,
        "test_loss": result.loss, "test_top1": result.top1, "test_top5": result.top5,
        "elapsed": round(progress.elapsed, 3),
    }
    progress.history.append(record)
    with open(Path(run.config.out) / LOG_FILE, "a") as log:
        log.write(json.dumps(record) + "\n")
    tqdm.write(
        f"epoch {progress.epoch}: train loss {stats['train_loss']:.3f} acc {stats['train_top1']:.3f} | "
        f"test loss {result.loss:.3f} top-1 {result.top1:.4f} top-5 {result.top5:.4f} | "
        f"{stats['images_per_sec']:.0f} img/s"
    )


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


def _training_summary(run: Run, result: EvalResult) -> dict:
    config, dataset, ctx, progress = run.config, run.dataset, run.ctx, run.progress
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
