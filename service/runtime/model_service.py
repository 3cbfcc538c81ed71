"""The model service of the split layout: one batched model worker per GPU.

The API workers (service.service) call it through `bentoml.depends` with
uint8 pixel arrays they decoded; `predict` is a batchable API, so BentoML's
adaptive batching merges the calls of every API worker into one forward
pass (up to MAX_BATCH_SIZE images, within MAX_LATENCY_MS, shedding what would
miss it with a 503).

Security: BentoML carries these calls as pickles (its
`application/vnd.bentoml+pickle` media type) over a Unix socket in a private
temporary directory (mode 0700) that only the serving user can open; the
service is never bound to a TCP port and never exposed publicly. Only our
API workers speak to it, and what they send is arrays and strings they built
themselves: request bytes from clients are decoded into pixels (or refused)
in the API worker and never reach an unpickler. (BentoML itself refuses
pickled bodies on the public API server.)
"""

from __future__ import annotations

import numpy as np
import bentoml
import torch
from pydantic import BaseModel, ConfigDict

from model.attribution import AttributionRequest
from service.runtime.backend import describe_predictor
from service.runtime.model_version import (
    ModelVersion, build_predictor, load_or_exit, load_version, locate_model, version_key,
)
from service.core import tracing
from service.core.settings import CONFIG, Layout
from service.core.metrics import ServiceMetrics
from service.control.follower import follow_versions
from service.control.rollout_follower import follow_rollouts
from service.runtime.rollout import CandidateHolder

LAYOUT = Layout.choose(CONFIG)


class ExplainPayload(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    class_index: int
    probability: float
    input_map: np.ndarray
    signed: bool
    layer_map: np.ndarray  # empty (0, 0) for the methods without one: BentoML's schemas take no `ndarray | None`
    version_key: int  # the version that computed it (service.runtime.backend.version_key)


def _device_for_worker() -> torch.device:
    """Worker i of n takes GPU (i - 1) mod gpus: one model worker per GPU (BentoML numbers workers from 1)."""
    if LAYOUT.gpus == 0 or CONFIG.device == "cpu":
        return torch.device("cpu")
    if CONFIG.device.startswith("cuda:"):
        return torch.device(CONFIG.device)
    return torch.device("cuda", (bentoml.server_context.worker_index - 1) % LAYOUT.gpus)


if CONFIG.tracing_endpoint:
    tracing.drop_message_spans()


@bentoml.service(
    name="cnn_model",
    workers=LAYOUT.model_workers or 1,
    threads=CONFIG.forward_threads + 2,  # batched forwards, plus feature maps / attributions beside them
    resources={"gpu": LAYOUT.gpus} if LAYOUT.gpus else {"cpu": "1"},
    traffic={"timeout": CONFIG.request_timeout_s},
    logging={"access": {"enabled": False}},  # one access-log line per client request: the API worker's
    # BentoML's client to this service recycles its connection pool every 100 requests (and 5
    # minutes) by closing the pool, which fails the calls still in flight on it ("Server
    # disconnected"; bentoml/BentoML#4971, #5540): 2% of requests at 32 clients here. The pool
    # lives as long as the worker instead.
    runner_connection={"max_requests": 2**62, "max_age": 10.0**12},
    # its server spans continue the API worker's batch span (service.core.tracing)
    **({"tracing": TRACING} if (TRACING := tracing.tracing_config(CONFIG.tracing_endpoint,
                                                                  CONFIG.tracing_sample_rate)) else {}),
)
class ModelService:
    def __init__(self) -> None:
        path, tag = locate_model(CONFIG)
        self.device = _device_for_worker()
        version = ModelVersion.loaded(tag, path, build_predictor(CONFIG, load_or_exit(path), self.device, cpu_threads=1))
        self.metrics = ServiceMetrics(self.device.type)
        self.current = version
        self.install(version)
        self.classes = version.manifest.model_config.num_classes
        self.candidates = CandidateHolder()  # a rollout's candidate (service.control.rollout), beside `current`
        self.follower = follow_versions(self, "model", version.tag)
        follow_rollouts(self, self.follower, self.follower.control, LAYOUT.api_workers + LAYOUT.model_workers,
                        float(CONFIG.request_timeout_s * 4))

    def load(self, tag: str) -> ModelVersion:
        held = self.candidates.candidate  # a promoted candidate is the one already loaded
        if held is not None and held.tag == tag:
            return held
        return load_version(CONFIG, tag, self.device, self.current.manifest)

    def install(self, version: ModelVersion) -> None:
        self.metrics.announce_model(version.tag, version.predictor, self.device.type)
        self.current = version  # one assignment; each call below reads it once

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, classes + D + 2): probabilities | embedding | forward seconds / N |
        the key of the version that ran the batch (service.runtime.backend.version_key)."""
        return self._predict_with(self.current, images)

    def _predict_with(self, version: ModelVersion, images: np.ndarray) -> np.ndarray:
        output = version.predictor.predict(torch.from_numpy(images).permute(0, 3, 1, 2))
        self.metrics.observe_batch(len(images), output.forward_seconds)
        self._update_gpu_gauges()
        per_image = torch.full((len(images), 1), output.forward_seconds / len(images))
        key = torch.full((len(images), 1), float(version_key(version.tag)))
        return torch.cat([output.probabilities, output.embeddings, per_image, key], dim=1).numpy()

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def predict_candidate(self, images: np.ndarray) -> np.ndarray:
        """`predict` by a rollout's candidate (the served version when none is held: the key says which)."""
        return self._predict_with(self.candidates.candidate or self.current, images)

    @bentoml.api
    def activations(self, image: np.ndarray, layers: list[str], stage: str = "post_relu") -> list[np.ndarray]:
        """The maps of `layers`, then the key of the version that computed them."""
        version = self.current
        found = version.predictor.activations(torch.from_numpy(image).permute(2, 0, 1), layers, stage)
        return [*(found[name].numpy() for name in layers), np.array([version_key(version.tag)], np.float64)]

    @bentoml.api
    def explain(self, image: np.ndarray, request: dict) -> ExplainPayload:
        """`request`: a resolved model.attribution.AttributionRequest's fields."""
        version = self.current
        found = version.predictor.explain(torch.from_numpy(image).permute(2, 0, 1), AttributionRequest(**request))
        return ExplainPayload(class_index=found.class_index, probability=found.probability,
                              input_map=found.input_map.numpy(), signed=found.signed,
                              layer_map=np.zeros((0, 0), np.float32) if found.layer_map is None
                              else found.layer_map.numpy(), version_key=version_key(version.tag))

    @bentoml.api
    def kernels(self, layer: str) -> np.ndarray:
        return self.current.predictor.kernels(layer).numpy()

    @bentoml.api
    def describe(self) -> dict:
        return describe_predictor(self.current.predictor)

    def _update_gpu_gauges(self) -> None:
        memory = self.current.predictor.gpu_memory()
        if memory is not None:
            self.metrics.gpu_allocated.set(memory[0])
            self.metrics.gpu_reserved.set(memory[1])
            self.metrics.gpu_total.set(memory[2])
