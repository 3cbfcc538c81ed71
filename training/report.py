"""Evaluation reports as PNGs: curves, confusion matrix, conv1 kernels, feature maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model.checkpoint import Checkpoint  # noqa: E402
from model.preprocess import Normalizer  # noqa: E402
from model.visualize import encode_png, feature_map_grid, kernel_grid  # noqa: E402
from training.evaluate import EvalResult  # noqa: E402


def write_report(out: Path, checkpoint: Checkpoint, result: EvalResult, example: torch.Tensor) -> list[Path]:
    """Write the report PNGs; returns their paths. `example` is one uint8 (3, S, S) test image."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    history = checkpoint.manifest.training.get("history", [])
    if history:
        written.append(_curves(out / "training_curves.png", history))
    written.append(_confusion(out / "confusion_matrix.png", result, checkpoint.manifest.class_names))
    conv1 = checkpoint.model.get_submodule("conv1").weight
    path = out / "conv1_kernels.png"
    path.write_bytes(encode_png(kernel_grid(conv1)))
    written.append(path)
    written += _feature_maps(out, checkpoint, example)
    return written


def _curves(path: Path, history: list[dict]) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], label="test")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.plot(epochs, [h["train_top1"] for h in history], label="train top-1")
    acc_ax.plot(epochs, [h["test_top1"] for h in history], label="test top-1")
    acc_ax.plot(epochs, [h["test_top5"] for h in history], label="test top-5", linestyle="--")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def _confusion(path: Path, result: EvalResult, class_names: list[str]) -> Path:
    n = len(class_names)
    size = min(16, 3 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = result.confusion.float() / result.confusion.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                count = int(result.confusion[i, j])
                if count:
                    ax.text(j, i, count, ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix (top-1 {result.top1:.3f})")
    return _save(fig, path)


@torch.no_grad()
def _feature_maps(out: Path, checkpoint: Checkpoint, example: torch.Tensor) -> list[Path]:
    model = checkpoint.model
    inputs = Normalizer(checkpoint.manifest.preprocessing)(example.unsqueeze(0))
    maps = model.extract(inputs, {name: "post_relu" for name in model.conv_layers})
    paths = [out / "example_input.png"]
    paths[0].write_bytes(encode_png(example.permute(1, 2, 0).contiguous()))
    for name in model.conv_layers:
        path = out / f"feature_maps_{name}.png"
        path.write_bytes(encode_png(feature_map_grid(maps[name][0][:64])))
        paths.append(path)
    return paths


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # pyplot keeps every open figure alive until closed
    return path
