"""Checkpoint format: a directory with `weights.safetensors` and `manifest.json`.

safetensors holds raw tensors and a JSON header only, so loading executes no
code (unlike pickle-based `.pt` files). The manifest says how to rebuild the
network and preprocess its inputs, and carries the weights' sha256 so that a
truncated or tampered file is caught before it is used.

Write order: weights first, then the manifest, each atomically. A crash
between the two leaves a manifest whose hash does not match, which loading
reports; it never leaves a silently mixed checkpoint.

Other files that belong to these weights (the channel atlas: training.atlas)
are listed in the manifest's `files` with their sha256, written before the
manifest that names them, and verified on load like the weights. Retraining
writes a manifest without them: they described the old weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import PurePosixPath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from model.atomic import atomic_write_bytes
from model.config import ModelConfig, Preprocessing
from model.network import AlexNet

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Manifest:
    model_config: ModelConfig
    preset: str
    class_names: list[str]
    preprocessing: Preprocessing
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    created_at: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, besides the weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "preset": self.preset,
            "model_config": self.model_config.to_dict(),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "training": self.training,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": self.weights_sha256,
            "files": dict(self.files),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        return cls(
            model_config=ModelConfig.from_dict(data["model_config"]),
            preset=str(data["preset"]),
            class_names=[str(c) for c in data["class_names"]],
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            training=dict(data.get("training") or {}),
            weights_sha256=str(data["weights_sha256"]),
            format_version=int(data["format_version"]),
            created_at=float(data.get("created_at", 0.0)),
            files={_safe_relative(str(k)): str(v) for k, v in (data.get("files") or {}).items()},
        )


def _safe_relative(name: str) -> str:
    """A path inside the checkpoint directory, or ValueError (no absolute paths, no '..')."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise ValueError(f"file {name!r} is not a plain path inside the checkpoint")
    return str(path)


@dataclass
class Checkpoint:
    model: AlexNet
    manifest: Manifest
    path: Path


def save_checkpoint(
    directory: str | Path,
    model: AlexNet,
    class_names: list[str],
    preprocessing: Preprocessing,
    preset: str,
    training: dict[str, Any] | None = None,
) -> Manifest:
    directory = Path(directory)
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.config.num_classes}-class model")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    weights = safetensors_save(tensors, metadata={"format": "pt", "preset": preset})
    manifest = Manifest(
        model_config=model.config,
        preset=preset,
        class_names=list(class_names),
        preprocessing=preprocessing,
        training=dict(training or {}),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        created_at=time.time(),
    )
    atomic_write_bytes(directory / WEIGHTS_FILE, weights)
    write_manifest(directory, manifest)
    return manifest


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Replace a checkpoint's manifest (atomically), e.g. to add what was measured after training."""
    atomic_write_bytes(Path(directory) / MANIFEST_FILE, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())


def attach_files(directory: str | Path, files: dict[str, bytes]) -> Manifest:
    """Write files that belong to the checkpoint's weights, then list them (with their sha256) in
    its manifest; files of the same names are replaced."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, data in files.items():
        name = _safe_relative(name)
        atomic_write_bytes(directory / name, data)
        manifest.files[name] = hashlib.sha256(data).hexdigest()
    write_manifest(directory, manifest)
    return manifest


def read_attached(directory: str | Path, manifest: Manifest, name: str) -> bytes:
    """An attached file's bytes, verified against the manifest's sha256."""
    if name not in manifest.files:
        raise CheckpointError(f"{Path(directory) / MANIFEST_FILE}: lists no file {name!r}")
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: {err.strerror or err}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.files[name]:
        raise CheckpointError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                              f"{manifest.files[name][:16]}... (truncated, tampered or from other weights)")
    return data


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {Path(directory)} a checkpoint directory?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid manifest ({type(err).__name__}: {err})") from None
    if len(manifest.class_names) != manifest.model_config.num_classes:
        raise CheckpointError(
            f"{path}: {len(manifest.class_names)} class names for a "
            f"{manifest.model_config.num_classes}-class model"
        )
    return manifest


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load a checkpoint. Raises CheckpointError naming the bad file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    blob = weights_path.read_bytes()
    _check_digest(weights_path, hashlib.sha256(blob).hexdigest(), manifest)
    try:
        tensors = safetensors_load(blob)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({err})") from None
    # Built on the meta device, then given the file's tensors (assign): no random initialization of
    # weights about to be replaced, no second copy of them -- for AlexNet 0.27 of the 0.68 CPU seconds
    # a load took, seconds a model move takes from the requests being served. Shapes are still checked.
    with torch.device("meta"):
        model = AlexNet(manifest.model_config)
    try:
        model.load_state_dict(_as_float32(tensors), strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path}: weights do not fit the manifest's model config: {err}") from None
    for name in manifest.files:
        read_attached(directory, manifest, name)  # every attached file present and intact
    model.to(device).eval()
    return Checkpoint(model=model, manifest=manifest, path=directory)


def _as_float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point weights in fp32, as a freshly built network holds them (a copy only where one
    is not fp32 already); counters such as BatchNorm's num_batches_tracked unchanged."""
    return {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}


def _check_digest(weights_path: Path, digest: str, manifest: Manifest) -> None:
    if digest != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights_path}: sha256 {digest[:16]}... does not match the manifest's "
            f"{manifest.weights_sha256[:16]}... (truncated, tampered or from another checkpoint)"
        )


HASH_CHUNK = 1 << 20


def verify_checkpoint(directory: str | Path) -> Manifest:
    """A checkpoint's manifest, once every file it lists is present and matches its sha256 -- the
    checks of `load_checkpoint`, in its words, with the weights streamed through the hash 1 MiB at a
    time: nothing loaded, nothing built (what a running service checks before it moves to a version)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights_path = directory / WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        with open(weights_path, "rb") as weights:
            while chunk := weights.read(HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{weights_path}: {err.strerror or err}") from None
    _check_digest(weights_path, digest.hexdigest(), manifest)
    for name in manifest.files:
        read_attached(directory, manifest, name)  # every attached file present and intact
    return manifest


class IncompatibleModel(ValueError):
    """A version the running service cannot switch to (clients and decoders depend on what differs)."""


def check_compatible(served: Manifest, candidate: Manifest) -> None:
    """Refuse a version clients could tell apart by more than its answers: its preprocessing (clients
    and decoders size and normalize images for the served model) or its architecture (layer names
    and shapes, the number of classes: what feature-map, attribution and OIP clients ask for).
    A new version is the same network with other weights (and may rename its classes)."""
    if candidate.preprocessing != served.preprocessing:
        raise IncompatibleModel(f"its preprocessing {candidate.preprocessing.to_dict()} differs from the served "
                                f"model's {served.preprocessing.to_dict()}; serve it with a restart instead")
    if candidate.model_config != served.model_config:
        raise IncompatibleModel(f"its architecture ({candidate.preset}: {candidate.model_config.name}) differs from "
                                f"the served model's ({served.preset}: {served.model_config.name}); serve it with "
                                "a restart instead")
