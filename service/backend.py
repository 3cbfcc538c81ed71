"""Where the model runs, as the API service sees it: in this process, or in the model service.

Both backends answer the same awaitable calls with numpy arrays, so the
endpoints do not care which layout is serving:
  - LocalBackend: the Predictor in this process; batches form in our own
    batcher (service.batching) and run in a worker thread.
  - RemoteBackend: the model service (service.model_service), reached through
    `bentoml.depends`; batches form in BentoML's adaptive batching there,
    across every API worker's requests.
What a caller may ask (layer names, class range) is checked here, against the
model's structure, before any work: model/ raises the typed errors
(model.errors), the endpoints turn them into 4xx.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import torch

from model import store
from model.attribution import AttributionRequest
from model.checkpoint import CheckpointError, Manifest, load_checkpoint, read_manifest
from model.inference import NullPredictor, Predictor, configure_cpu_threads
from model.network import AlexNet
from model.summary import LayerInfo, layer_table
from service.batching import Batcher
from service.config import ServiceConfig


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


def build_predictor(config: ServiceConfig, path: Path, device: torch.device, cpu_threads: int) -> Predictor:
    """The model of the checkpoint at `path`, on `device`, warmed up (compiled LRN included)."""
    if device.type == "cpu":
        configure_cpu_threads(config.torch_threads or cpu_threads)
    kind = NullPredictor if config.null_model else Predictor
    predictor = kind(load_or_exit(path), device, config.precision, parallel=config.forward_threads)
    predictor.warm_up((1, min(8, config.max_batch_size)))
    return predictor


@dataclass
class ModelShape:
    """What the API process knows of the model without its weights: manifest, structure, layer table."""

    manifest: Manifest
    network: AlexNet  # on the "meta" device: shapes and names, no numbers
    layers: dict[str, LayerInfo]

    @classmethod
    def of(cls, path: Path) -> ModelShape:
        manifest = read_manifest(path)
        with torch.device("meta"):
            network = AlexNet(manifest.model_config)
        return cls.of_network(manifest, network)

    @classmethod
    def of_network(cls, manifest: Manifest, network: AlexNet) -> ModelShape:
        return cls(manifest, network, {row.name: row for row in layer_table(network)})


@dataclass
class ExplainResult:
    """An attribution of one image (model.attribution.Attribution as numpy): /explain's, and
    /gradcam's, which is /explain with method=gradcam."""

    class_index: int  # the served answer's class (or the one asked for) ...
    probability: float  # ... and its probability from the serving copy, as /classify gives it
    input_map: np.ndarray  # (S, S) float32
    signed: bool
    layer_map: np.ndarray | None  # Grad-CAM: at the layer's resolution, in [0, 1]


class LocalBackend:
    def __init__(self, predictor: Predictor, config: ServiceConfig, observe_batch):
        self.predictor = predictor
        self.shape_of = predictor.model  # for the checks
        self._observe = observe_batch
        self.batcher = Batcher(self._forward, self._split, config.max_batch_size, config.max_latency_ms / 1000,
                               parallel=config.forward_threads, observe=self._observed)

    async def _forward(self, batch: np.ndarray):
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2)  # NHWC -> NCHW, channels-last in memory
        return await anyio.to_thread.run_sync(self.predictor.predict, pixels)

    @staticmethod
    def _split(output, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return output.probabilities[start:stop].numpy(), output.embeddings[start:stop].numpy()

    def _observed(self, images: int, output) -> None:
        self._observe(images, output.forward_seconds)

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (k, C), embeddings (k, D)) for uint8 images (k, S, S, 3)."""
        return await self.batcher.submit(images)

    async def activations(self, image: np.ndarray, layers: list[str], stage: str) -> dict[str, np.ndarray]:
        found = await anyio.to_thread.run_sync(self.predictor.activations, _chw(image), layers, stage)
        return {name: value.numpy() for name, value in found.items()}

    async def explain(self, image: np.ndarray, request: AttributionRequest) -> ExplainResult:
        found = await anyio.to_thread.run_sync(self.predictor.explain, _chw(image), request)
        return ExplainResult(found.class_index, found.probability, found.input_map.numpy(), found.signed,
                             None if found.layer_map is None else found.layer_map.numpy())

    async def kernels(self, layer: str) -> np.ndarray:
        return self.predictor.kernels(layer).numpy()

    async def describe(self) -> dict:
        return describe_predictor(self.predictor)


def describe_predictor(predictor: Predictor) -> dict:
    memory = predictor.gpu_memory()
    return {"device": str(predictor.device), "dtype": predictor.dtype_name, "precision": predictor.precision.to_dict(),
            "gpu_memory": None if memory is None else dict(zip(("allocated", "reserved", "total"), memory))}


class RemoteBackend:
    # Batches in flight from one API worker: while the model service runs one, the next forms.
    PARALLEL_BATCHES = 2

    def __init__(self, model_service, shape: ModelShape, config: ServiceConfig, observe_batch):
        self.remote = model_service.to_async
        self.shape_of = shape.network
        self.classes = shape.manifest.model_config.num_classes
        self._observe = observe_batch
        self.batcher = Batcher(lambda batch: self.remote.predict(batch), self._split, config.max_batch_size,
                               config.max_latency_ms / 1000, parallel=self.PARALLEL_BATCHES, observe=self._observed)

    def _split(self, out: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # columns: probabilities | embedding | forward seconds per image of the batch it ran in
        return out[start:stop, :self.classes], out[start:stop, self.classes:-1]

    def _observed(self, images: int, out: np.ndarray) -> None:
        self._observe(images, float(out[:, -1].sum()))

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self.batcher.submit(images)

    async def activations(self, image: np.ndarray, layers: list[str], stage: str) -> dict[str, np.ndarray]:
        """`layers` come checked by the endpoint (typed errors cannot cross processes)."""
        return dict(zip(layers, await self.remote.activations(image, layers, stage)))

    async def explain(self, image: np.ndarray, request: AttributionRequest) -> ExplainResult:
        """`request` comes resolved (checked against the model's structure) by the endpoint."""
        found = await self.remote.explain(image, dataclasses.asdict(request))
        layer_map = found.layer_map if found.layer_map.size else None
        return ExplainResult(found.class_index, found.probability, found.input_map, found.signed, layer_map)

    async def kernels(self, layer: str) -> np.ndarray:
        self.shape_of.check_conv_layer(layer)
        return await self.remote.kernels(layer)

    async def describe(self) -> dict:
        return await self.remote.describe()


def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> a (3, S, S) view."""
    return torch.from_numpy(image).permute(2, 0, 1)
