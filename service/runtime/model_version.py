"""A model version as a worker serves it: found in the store, loaded and verified, built for serving
(precision, warm-up), with the layer table and the channel atlas every answer about it draws on."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model import store
from model.checkpoint import Checkpoint, CheckpointError, Manifest, check_compatible, load_checkpoint, read_manifest
from model.inference import NullPredictor, Predictor, configure_cpu_threads
from model.network import AlexNet
from model.summary import LayerInfo, layer_table
from service.core.settings import ServiceConfig
from service.runtime.atlas import Atlas


def locate_model(config: ServiceConfig) -> tuple[Path, str]:
    """The checkpoint directory to serve and its tag: CHECKPOINT_DIR, or MODEL_TAG in the model store."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir), f"dir:{Path(config.checkpoint_dir).name}"
    from bentoml.exceptions import NotFound

    try:
        return store.resolve(config.model_tag)
    except (NotFound, ValueError) as err:
        raise SystemExit(
            f"cannot serve: model {config.model_tag!r} is not in the BentoML model store ({err}). "
            "Train and register one with `make default-model`, or set CHECKPOINT_DIR."
        ) from None


def load_or_exit(path: Path):
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"cannot serve: the model is missing, corrupt or incomplete: {err}") from None


def build_predictor(config: ServiceConfig, checkpoint: Checkpoint, device: torch.device, cpu_threads: int) -> Predictor:
    """The model of a loaded (verified) checkpoint, on `device`, warmed up (compiled LRN included)."""
    if device.type == "cpu":
        configure_cpu_threads(config.torch_threads or cpu_threads)
    kind = NullPredictor if config.null_model else Predictor
    predictor = kind(checkpoint, device, config.precision, parallel=config.forward_threads,
                     full_batch=config.max_batch_size)
    predictor.warm_up((1, min(8, config.max_batch_size)))
    return predictor


def version_key(tag: str) -> int:
    """A number that names a version in a float32 column (24 bits: exact in float32), for the split
    layout's model service to say which version computed a batch."""
    return zlib.crc32(tag.encode()) & 0xFFFFFF


@dataclass
class ModelVersion:
    """One version of the model as a worker serves it. Everything an answer draws on -- the weights,
    class names, layer table, atlas, tag -- comes from one of these, so no answer mixes versions."""

    tag: str
    manifest: Manifest
    network: AlexNet  # the structure requests are checked against (the serving network, or on "meta")
    layers: dict[str, LayerInfo]
    atlas: Atlas
    predictor: Predictor | None = None  # None in the split layout's API workers: the model worker holds it

    @classmethod
    def loaded(cls, tag: str, path: Path, predictor: Predictor) -> ModelVersion:
        return cls(tag, predictor.manifest, predictor.model, _layers(predictor.reference),
                   Atlas(path, predictor.manifest), predictor)

    @classmethod
    def shape_only(cls, tag: str, path: Path) -> ModelVersion:
        """What an API worker of the split layout knows: manifest, structure, layer table, atlas."""
        manifest = read_manifest(path)
        with torch.device("meta"):
            network = AlexNet(manifest.model_config)
        return cls(tag, manifest, network, _layers(network), Atlas(path, manifest))


def _layers(network: AlexNet) -> dict[str, LayerInfo]:
    return {row.name: row for row in layer_table(network)}


def load_version(config: ServiceConfig, tag: str, device: torch.device, served: Manifest | None) -> ModelVersion:
    """A new version, loaded beside the served one: in the store, every hash verified, compatible with
    `served`, the precision guard applied, warmed up. Raises on any problem (the served version is
    untouched)."""
    path, full_tag = store.resolve(tag)
    checkpoint = load_checkpoint(path)  # verifies the weights' and every attached file's sha256
    if served is not None:
        check_compatible(served, checkpoint.manifest)
    predictor = build_predictor(config, checkpoint, device, cpu_threads=torch.get_num_threads())
    return ModelVersion.loaded(full_tag, path, predictor)
