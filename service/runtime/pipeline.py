"""One request's way through a worker, whatever its protocol: admit -> decode -> predict -> shape -> observe.

Built once per API worker by the service (service.service, `build_pipeline`) and handed to
what serves requests: the REST endpoints, the Open Inference Protocol's routes (service.oip)
and the guards and routes in front of BentoML (service.http), through the worker's
`Running` handle (service.core.running). Each stage is one method here, so every protocol
admits, decodes, batches, counts and refuses the same way:

  admitted     admission control charges the request its cost and its share of the model's
               lane (service.runtime.admission); the door (service.http.guards.AdmitWhenRoom)
               admitted it at an estimate before its body was read, and this settles it
  decode       images to uint8 pixels at about the model's size (service.runtime.decoding)
  predict      the pixels batched with other requests' through the backend (service.runtime.backend):
               the served version, or during a rollout its candidate (service.runtime.rollout)
  ranked       the top-k classes of each image, as /classify and OIP's classification give them
  observe_*    the metrics (service.core.metrics)
  refusal_response  an exception turned into its 4xx/503 answer, counted: the one place that does it
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from model.inference import pick_device
from model.preprocess import DecodeLimits
from service.control.control_dir import ControlDir
from service.core import endpoints, timeline
from service.core.metrics import ServiceMetrics
from service.core.refusals import Refusal, refusal_for
from service.core.settings import Layout, ServiceConfig
from service.runtime.admission import TICKET, Admission
from service.runtime.backend import ATTRIBUTIONS_AT_ONCE, LocalBackend, Predictions, RemoteBackend
from service.runtime.model_version import ModelVersion, build_predictor, load_or_exit, load_version
from service.runtime.decoding import Decoder, decode_seconds_per_byte
from service.runtime.rollout import RolloutSide


class Pipeline:
    def __init__(self, config: ServiceConfig, layout: Layout, device: torch.device, metrics: ServiceMetrics):
        self.config, self.layout, self.device, self.metrics = config, layout, device, metrics
        self.backend: LocalBackend | RemoteBackend
        self.admission: Admission
        self.decoder: Decoder
        self.candidates: RolloutSide  # a rollout's candidate, beside the served version
        self.input_size = 0  # the same for every version the worker may move to

    # ----- the served version: everything a request draws on comes from one ------------------

    @property
    def version(self) -> ModelVersion:
        """The version this request pinned (service.runtime.backend), or the current one."""
        return self.backend.version()

    def pin(self) -> ModelVersion:
        """Fix this request's version, from its checks to its answer."""
        return self.backend.pin()

    def load(self, tag: str) -> ModelVersion:
        """A version to move to, loaded beside the served one (service.control.follower calls this): a
        rollout's candidate, promoted, is the one already loaded."""
        held = self.candidates.candidate
        if held is not None and held.tag == tag:
            return held
        if self.layout.split:  # the model worker loads the weights; this worker needs the shape and the atlas
            from model import store

            path, full_tag = store.resolve(tag)
            return ModelVersion.shape_only(full_tag, path)
        return load_version(self.config, tag, self.device, self.backend.current.manifest)

    def install(self, version: ModelVersion) -> None:
        if version.predictor is not None:
            self.metrics.announce_model(version.tag, version.predictor, self.device.type)
        self.backend.install(version)

    # ----- the stages ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, endpoint: str, forward_passes: float, encoded_bytes: int = 0, kind: str = "",
                       share: float = 0.0):
        """Charge this request its exact cost and its `share` of the lane of the model the endpoint runs in
        (service.core.endpoints, service.runtime.admission): settle the ticket the door gave it at an
        estimate, or, where no door ran, admit it here."""
        units = self.admission.units(forward_passes, encoded_bytes, kind)
        lane = endpoints.lane_of(endpoint)
        ticket = TICKET.get()
        if ticket is not None:
            if not self.admission.settle(ticket, units, share if lane else None):
                raise Refusal.overloaded(self.config.retry_after_s)
            self.metrics.observe_admission(self.admission)
            yield
            return
        ticket = await self.admission.enter(units, lane=lane, share=share if lane else 0.0)
        if ticket is None:
            raise Refusal.overloaded(self.config.retry_after_s)
        served = False
        try:
            yield
            served = True
        finally:
            self.admission.release(ticket, served)
            self.metrics.observe_admission(self.admission)

    def expecting(self, images: int):
        """Images on their way to the batcher (decoding): a deep queue's next batch may wait for them."""
        return self.backend.batcher.expecting(images)

    async def decode(self, endpoint: str, payloads: list[bytes]) -> np.ndarray:
        timer = self.metrics.preprocess_seconds.labels(endpoint, self.metrics.device)
        request = timeline.current()
        if request is not None:  # BentoML's parsing ran from the body's end to here
            request.images = len(payloads)
            body_end = max((end for stage, _, end in request.stages if stage == "body"), default=None)
            if body_end is not None:
                request.record("parse", body_end, time.perf_counter())
        with timeline.stage("decode"):
            return await self.decoder.decode(payloads, timer)

    async def predict(self, endpoint: str, payloads: list[bytes]) -> Predictions:
        """Encoded images admitted, decoded and batched: probabilities and embeddings, and their version."""
        async with self.admitted(endpoint, len(payloads), sum(len(data) for data in payloads), share=len(payloads)):
            with self.expecting(len(payloads)):
                pixels = await self.decode(endpoint, payloads)
            predicted = await self.forward(pixels)
        _answering(predicted.version.tag)
        return predicted

    async def forward(self, pixels: np.ndarray) -> Predictions:
        """Decoded pixels through the model, batched: the served version's answer, or a rollout's
        candidate's for its canary clients (service.runtime.rollout)."""
        return await self.candidates.predict(pixels)

    async def on_one_image(self, endpoint: str, data: bytes, work, cost: int = 1, kind: str = ""):
        """One encoded image through `work(pixels)`: admitted (as `cost` images' worth of forward passes,
        one request in the endpoint's lane), decoded, timed and counted."""
        async with self.admitted(endpoint, cost, len(data), kind, share=1):
            pixels = (await self.decode(endpoint, [data]))[0]
            with self.metrics.forward_seconds.labels(endpoint, self.metrics.device).time(), timeline.stage("forward"):
                result = await work(pixels)
        _answering(self.version.tag)
        self.metrics.images.labels(endpoint).inc()
        return result

    # ----- shaping and observing -------------------------------------------------------------

    @staticmethod
    def ranked(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class indices, probabilities) of each image's top k, highest first; ties in index order."""
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(probabilities, order, axis=1)

    def observe_predictions(self, endpoint: str, predicted: Predictions) -> None:
        """The images answered, and the drift signals (top-1 class and its probability) once per image."""
        probabilities, names = predicted.probabilities, predicted.version.manifest.class_names
        top = probabilities.argmax(axis=1)  # the first of equals, as `ranked` orders them
        self.metrics.observe_predictions(endpoint, [names[i] for i in top.tolist()],
                                         probabilities[np.arange(len(top)), top].tolist())

    def observe_batch(self, images: int, forward_seconds: float) -> None:
        self.admission.observe_forward(images, forward_seconds)
        if not self.layout.split:  # the model service counts its own batches
            self.metrics.observe_batch(images, forward_seconds)

    def refusal_response(self, endpoint: str | None, err: Exception, oip: bool = False):
        """The answer to `err`, raised while serving a request to `endpoint` (None: not counted): a refusal
        (ours, or model/'s typed errors) as its 4xx/503 body -- the protocol's for OIP -- counted in
        cnn_refusals_total; anything else is a fault, raised again (a 500)."""
        refusal = refusal_for(err, self.config.retry_after_s)
        if refusal is None:
            raise err
        if endpoint is not None:
            self.metrics.refusals.labels(endpoint, refusal.reason).inc()
        timeline.note_refusal(refusal.reason)
        return refusal.oip_response() if oip else refusal.response()

    @property
    def precision_name(self) -> str | None:
        """What the served version computes in (None where the model worker holds it: the split layout)."""
        predictor = self.version.predictor
        return predictor.dtype_name if predictor is not None else None


def _answering(model: str) -> None:
    request = timeline.current()
    if request is not None:
        request.model = model
        request.answering()


def build_pipeline(config: ServiceConfig, layout: Layout, model_path, model_tag: str, control: ControlDir,
                   model_service=None) -> Pipeline:
    """A worker's pipeline: the model (in this process, or the split layout's `model_service`), admission
    sized from it, the decoder; the version announced in the metrics."""
    device = pick_device(config.device)
    pipeline = Pipeline(config, layout, device, ServiceMetrics("cpu" if layout.split else device.type))
    metrics = pipeline.metrics
    if layout.split:
        version = ModelVersion.shape_only(model_tag, model_path)
        pipeline.backend = RemoteBackend(model_service, version, config, pipeline.observe_batch,
                                         lambda outcome: metrics.model_worker_retries.labels(outcome).inc())
        initial_rate = 100.0 / layout.api_workers  # replaced by what it measures within a second of load
    else:
        # Every worker's forward may use every core: alone (low load) it is as fast as one process;
        # busy, the workers share them (BENCHMARKS.md measured 1 vs 2 workers, 1 vs all threads).
        predictor = build_predictor(config, load_or_exit(model_path), device, cpu_threads=os.cpu_count() or 1)
        version = ModelVersion.loaded(model_tag, model_path, predictor)
        pipeline.backend = LocalBackend(version, config, pipeline.observe_batch,
                                        lambda kind, passes, seconds: pipeline.admission.observe_work(kind, passes,
                                                                                                    seconds),
                                        control=control)
        probe = predictor.predict(torch.zeros(8, 3, predictor.input_size, predictor.input_size, dtype=torch.uint8))
        initial_rate = 8 / probe.forward_seconds
        metrics.announce_model(version.tag, predictor, device.type)
    limits = DecodeLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    # Each worker measures its own completion rate (service.runtime.admission), so each takes the whole
    # budget. The model's lanes: the batcher's images, the attributions' requests (one per worker:
    # computed one at a time on the machine, the other workers' are next).
    lanes = {"batch": config.batches_in_flight(device.type == "cuda") * config.max_batch_size,
             "attribution": ATTRIBUTIONS_AT_ONCE}
    pipeline.admission = Admission(config.admission_target * config.max_latency_ms / 1000, initial_rate,
                                   wait_seconds=config.admission_wait_ms / 1000,
                                   decode_seconds_per_byte=decode_seconds_per_byte(version.manifest.preprocessing,
                                                                                   limits), lanes=lanes)
    pipeline.candidates = RolloutSide(pipeline.backend, metrics, max_shadow_images=config.max_batch_size)
    pipeline.input_size = version.manifest.preprocessing.input_size
    gpu = device if device.type == "cuda" and config.gpu_decode != "off" else None
    pipeline.decoder = Decoder(version.manifest.preprocessing, limits, gpu)
    return pipeline
