"""The resumable training state, kept beside the checkpoint as `train_state.pt`.

It holds only tensors, numbers, strings, lists and dicts, so loading it with
`torch.load(weights_only=True)` -- which refuses arbitrary pickled objects --
restores everything: model and optimizer state, counters, RNG state.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_write_bytes

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
