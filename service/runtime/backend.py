"""Where the model runs, as the API service sees it: in this process, or in the model service.

Both backends answer the same awaitable calls with numpy arrays, so the
endpoints do not care which layout is serving:
  - LocalBackend: the Predictor in this process; batches form in our own
    batcher (service.runtime.batching) and run in a worker thread.
  - RemoteBackend: the model service (service.runtime.model_service), reached through
    `bentoml.depends`; batches form in BentoML's adaptive batching there,
    across every API worker's requests.
What a caller may ask (layer names, class range) is checked here, against the
model's structure, before any work: model/ raises the typed errors
(model.errors), the endpoints turn them into 4xx.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import time
import dataclasses
from dataclasses import dataclass

import aiohttp
import anyio
import numpy as np
import torch

from model.attribution import AttributionRequest
from model.inference import Predictor
from service.control.control_dir import ControlDir
from service.core.priority import lower_this_thread
from service.core.refusals import Refusal
from service.core.settings import ServiceConfig
from service.runtime.batching import BatchPolicy, Batcher
from service.runtime.model_version import ModelVersion, version_key

# Attributions (/explain, /gradcam) computed at once on this machine, beside the batcher's forwards: each
# uses every core, and eight occlusion maps side by side oversubscribed two cores and spent 1.7x the CPU
# per unit of work (BENCHMARKS.md, goodput). One per worker was not enough: two workers computing one
# each took twice the share of the cores from the batches that one did, so the goodput of a mix of
# batches and occlusion maps depended on whether two /explain clients happened to connect to the same
# worker (BENCHMARKS.md, goodput). So one per machine: they take turns on the server's control directory.
# Admission holds the rest at the door (service.runtime.admission's lanes).
ATTRIBUTIONS_AT_ONCE = 1


_pinned: contextvars.ContextVar[ModelVersion | None] = contextvars.ContextVar("pinned_model_version", default=None)


@contextlib.contextmanager
def _unpinned():
    """No pinned version while a request starts work that may outlive it: a task started now (the
    batcher's, by the worker's first request; a client's connection pool) copies this context and
    lives as long as the worker, so a version pinned in it would never be freed after a move."""
    token = _pinned.set(None)
    try:
        yield
    finally:
        _pinned.reset(token)


class _Versions:
    """The versions a backend serves: `current`, swapped in one step, and a request's pinned one."""

    current: ModelVersion

    def pin(self) -> ModelVersion:
        """Fix the version this request (this asyncio task and what it calls) uses from now on."""
        version = self.current
        _pinned.set(version)
        return version

    def version(self) -> ModelVersion:
        """The request's pinned version, or the current one."""
        return _pinned.get() or self.current

    def install(self, version: ModelVersion) -> None:
        self.current = version  # one assignment: requests see the old version or the new, never half

    batcher: Batcher  # the served version's
    candidate_batchers: dict[str, Batcher]  # a rollout's candidate's: "canary" and "shadow"

    async def predict(self, images: np.ndarray, role: str = "served") -> Predictions:
        """Probabilities (k, C) and embeddings (k, D) for uint8 images (k, S, S, 3), batched with others;
        by a rollout's candidate for `role` canary or shadow. The batch carries the version that computed
        it (no request's pinned version is kept by the batcher's task)."""
        batcher = self.batcher if role == "served" else self.candidate_batchers[role]
        with _unpinned():
            return _handed_over(await batcher.submit(images))


@dataclass
class ExplainResult:
    """An attribution of one image (model.attribution.Attribution as numpy): /explain's, and
    /gradcam's, which is /explain with method=gradcam."""

    class_index: int  # the served answer's class (or the one asked for) ...
    probability: float  # ... and its probability from the serving copy, as /classify gives it
    input_map: np.ndarray  # (S, S) float32
    signed: bool
    layer_map: np.ndarray | None  # Grad-CAM: at the layer's resolution, in [0, 1]
    version: ModelVersion  # the version that computed it


@dataclass
class Predictions:
    """A request's rows of one batch, and the version that computed the batch."""

    probabilities: np.ndarray  # (k, classes)
    embeddings: np.ndarray  # (k, D)
    version: ModelVersion


class _Batch:
    """A forward pass's output, and the version that computed it."""

    __slots__ = ("output", "version")

    def __init__(self, output, version: ModelVersion | None):
        self.output, self.version = output, version


def _handed_over(answered: Predictions) -> Predictions:
    """The request's own copy of its batch's answer: the batcher keeps its last batch's futures (and
    their results) until the next batch, and must not keep a version alive after a move meanwhile."""
    mine = dataclasses.replace(answered)
    answered.version = None
    return mine


class LocalBackend(_Versions):
    def __init__(self, version: ModelVersion, config: ServiceConfig, observe_batch, observe_work=None,
                 control: ControlDir | None = None):
        self.current = version
        self._observe = observe_batch
        self._observe_work = observe_work or (lambda kind, passes, seconds: None)
        policy = BatchPolicy(config.max_batch_size, config.max_latency_ms / 1000, parallel=config.forward_threads)
        self.batcher = Batcher(self._forward, self._split, policy, observe=self._observed)
        # A rollout's candidate (service.runtime.rollout), batched apart: its canary's batches as the served
        # version's, its shadow copies in a thread at the lowest CPU priority.
        self.candidate: ModelVersion | None = None
        self._background = concurrent.futures.ThreadPoolExecutor(1, "shadow-forward", initializer=lower_this_thread)
        self.candidate_batchers = {"canary": Batcher(self._forward_candidate, self._split, policy),
                                   "shadow": Batcher(self._forward_shadow, self._split, policy)}
        # Attributions: ATTRIBUTIONS_AT_ONCE, not in the batches' lane (batches behind them waited seconds).
        self._attributions = anyio.CapacityLimiter(ATTRIBUTIONS_AT_ONCE)  # this worker's
        self._control = control  # where the machine's workers take turns (None: this worker alone)

    async def _forward(self, batch: np.ndarray) -> _Batch:
        return await self._run(self.current, batch)  # a batch runs on one version, whatever is swapped in meanwhile

    @staticmethod
    async def _run(version: ModelVersion, batch: np.ndarray, executor=None) -> _Batch:
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2)  # NHWC -> NCHW, channels-last in memory
        if executor is None:
            return _Batch(await anyio.to_thread.run_sync(version.predictor.predict, pixels), version)
        return _Batch(await asyncio.get_running_loop().run_in_executor(executor, version.predictor.predict, pixels),
                      version)

    async def _forward_candidate(self, batch: np.ndarray) -> _Batch:
        # dropped meanwhile: the served version computes it, and the answer says so
        return await self._run(self.candidate or self.current, batch)

    async def _forward_shadow(self, batch: np.ndarray) -> _Batch:
        return await self._run(self.candidate or self.current, batch, self._background)

    def hold_candidate(self, version: ModelVersion | None) -> None:
        self.candidate = version

    @staticmethod
    def _split(result: _Batch, start: int, stop: int) -> Predictions:
        output = result.output
        predictions = Predictions(output.probabilities[start:stop].numpy(), output.embeddings[start:stop].numpy(),
                                  result.version)
        if stop == len(output.probabilities):  # the batch's last share handed out: the batcher, which keeps
            result.version = None              # its last batch until the next one, no longer holds the version
        return predictions

    def _observed(self, images: int, result: _Batch) -> None:
        self._observe(images, result.output.forward_seconds)

    async def activations(self, image: np.ndarray, layers: list[str], stage: str) -> tuple[dict, ModelVersion]:
        version = self.version()
        found = await anyio.to_thread.run_sync(version.predictor.activations, _chw(image), layers, stage)
        return {name: value.numpy() for name, value in found.items()}, version

    async def explain(self, image: np.ndarray, request: AttributionRequest) -> ExplainResult:
        version = self.version()
        def timed():  # the time it computes, not the time it waited for its turn
            with self._control.taking_turns("attribution") if self._control else contextlib.nullcontext():
                start = time.perf_counter()
                return version.predictor.explain(_chw(image), request), time.perf_counter() - start

        found, seconds = await anyio.to_thread.run_sync(timed, limiter=self._attributions)
        self._observe_work(f"explain:{request.method}", request.cost(image.shape[0]), seconds)
        return ExplainResult(found.class_index, found.probability, found.input_map.numpy(), found.signed,
                             None if found.layer_map is None else found.layer_map.numpy(), version)

    async def kernels(self, layer: str) -> np.ndarray:
        return self.version().predictor.kernels(layer).numpy()

    async def describe(self) -> dict:
        return describe_predictor(self.version().predictor)


def describe_predictor(predictor: Predictor) -> dict:
    memory = predictor.gpu_memory()
    return {"device": str(predictor.device), "dtype": predictor.dtype_name, "precision": predictor.precision.to_dict(),
            "gpu_memory": None if memory is None else dict(zip(("allocated", "reserved", "total"), memory))}


class RemoteBackend(_Versions):
    # Batches in flight from one API worker: while the model service runs one, the next forms.
    PARALLEL_BATCHES = 2

    def __init__(self, model_service, version: ModelVersion, config: ServiceConfig, observe_batch,
                 observe_retry=lambda outcome: None):
        self.remote = model_service.to_async
        self.current = version
        self.classes = version.manifest.model_config.num_classes
        self.known = {version_key(version.tag): version}  # the versions the model service may answer with
        self.catch_up = lambda: None  # set by the service: hear an order the model service acted on first
        self._observe = observe_batch
        self._observe_retry = observe_retry  # (outcome: "answered" | "refused") of a call whose worker died
        self._budget_s = config.max_latency_ms / 1000
        self._retry_after_s = config.retry_after_s
        policy = BatchPolicy(config.max_batch_size, config.max_latency_ms / 1000, parallel=self.PARALLEL_BATCHES)
        self.batcher = Batcher(lambda batch: self._call("predict", batch), self._split, policy, observe=self._observed)
        # A rollout's candidate: the model worker holds its weights (ModelService.predict_candidate)
        self.candidate_batchers = {role: Batcher(lambda batch: self._call("predict_candidate", batch), self._split,
                                                 policy) for role in ("canary", "shadow")}

    # A call whose model worker died under it: the connection reset, closed or refused. (BentoML's client
    # of a `bentoml.depends` service is aiohttp's; BentoML starts another worker in the dead one's place.)
    WORKER_LOST = (aiohttp.ClientConnectionError,)
    RETRY_PAUSE_S = 0.05

    async def _call(self, method: str, *args):
        """The model service's `method(*args)`. Every call is idempotent (a forward pass, a feature map,
        an attribution), so if the model worker dies under it, it runs again on the worker BentoML
        starts in its place, as long as the latency budget (MAX_LATENCY_MS from the first try) lasts;
        after that it is refused with 503 model_unavailable + Retry-After, never a 500."""
        deadline = time.monotonic() + self._budget_s
        call = getattr(self.remote, method)
        try:
            return await call(*args)
        except self.WORKER_LOST as err:
            lost = err
        while (remaining := deadline - time.monotonic()) > 0:
            with anyio.move_on_after(remaining):
                try:
                    answer = await call(*args)
                except self.WORKER_LOST as err:
                    lost = err
                    await anyio.sleep(min(self.RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
                else:
                    self._observe_retry("answered")
                    return answer
        self._observe_retry("refused")
        raise Refusal.model_unavailable(self._retry_after_s, (
            f"the model worker stopped during this request ({type(lost).__name__}) and another was not ready "
            f"within the latency budget ({self._budget_s * 1000:.0f} ms); retry shortly"))

    KNOWN_VERSIONS = 4  # the versions an answer may still come from: the current one and the last few

    def install(self, version: ModelVersion) -> None:
        key = version_key(version.tag)
        self.known.pop(key, None)  # to the end: the oldest is first
        self.known[key] = version
        while len(self.known) > self.KNOWN_VERSIONS:  # a version many moves ago is no longer kept alive here
            self.known.pop(next(iter(self.known)))
        super().install(version)

    def hold_candidate(self, version: ModelVersion | None) -> None:
        """What the model worker's answers from a rollout's candidate are known by (its shape and atlas)."""
        if version is not None:
            self.known[version_key(version.tag)] = version

    def _answered_by(self, key: float) -> ModelVersion:
        if int(key) not in self.known:
            self.catch_up()
        return self.known.get(int(key), self.current)

    def _split(self, out: np.ndarray, start: int, stop: int) -> Predictions:
        # columns: probabilities | embedding | forward seconds per image | the version's key
        rows = out[start:stop]
        return Predictions(rows[:, :self.classes], rows[:, self.classes:-2], self._answered_by(rows[0, -1]))

    def _observed(self, images: int, out: np.ndarray) -> None:
        self._observe(images, float(out[:, -2].sum()))

    async def activations(self, image: np.ndarray, layers: list[str], stage: str) -> tuple[dict, ModelVersion]:
        """`layers` come checked by the endpoint (typed errors cannot cross processes)."""
        with _unpinned():
            *maps, key = await self._call("activations", image, layers, stage)
        return dict(zip(layers, maps)), self._answered_by(float(key[0]))

    async def explain(self, image: np.ndarray, request: AttributionRequest) -> ExplainResult:
        """`request` comes resolved (checked against the model's structure) by the endpoint."""
        with _unpinned():
            found = await self._call("explain", image, dataclasses.asdict(request))
        layer_map = found.layer_map if found.layer_map.size else None
        return ExplainResult(found.class_index, found.probability, found.input_map, found.signed, layer_map,
                             self._answered_by(found.version_key))

    async def kernels(self, layer: str) -> np.ndarray:
        self.version().network.check_conv_layer(layer)
        with _unpinned():
            return await self._call("kernels", layer)

    async def describe(self) -> dict:
        with _unpinned():
            return await self._call("describe")


def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (S, S, 3) -> a (3, S, S) view."""
    return torch.from_numpy(image).permute(2, 0, 1)
