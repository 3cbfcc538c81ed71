"""The models tests and load tests serve: the tests' tiny trained run, and untrained checkpoints for speed."""

from __future__ import annotations

from pathlib import Path

# Small enough for seconds on 2 CPU cores, big enough to learn well above chance (1/12).
TINY_TRAIN = ["--data", "shapes", "--preset", "small", "--shapes-per-class", "96", "--batch-size", "32"]
ATLAS_PER_CLASS = 20  # the tiny run's atlas: 240 generated test images


def untrained_checkpoint(preset: str, out: Path) -> Path:
    """A randomly initialized checkpoint: for load and speed only (its predictions mean nothing)."""
    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.network import AlexNet

    if (out / "manifest.json").exists():
        return out
    spec = get_preset(preset)
    save_checkpoint(out, AlexNet(spec.config).eval(), [f"class_{i}" for i in range(spec.config.num_classes)],
                    spec.preprocessing, preset, {"dataset": "none (untrained, for load tests)"})
    return out
