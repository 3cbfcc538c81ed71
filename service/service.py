"""The BentoML service: the public endpoints, and nothing else.

    bentoml serve .            # from the repo root (bentofile.yaml names this class)

A request's way through (service.core.settings explains the two layouts):
  1. admission control admits it at its cost, holds it in line for room, or
     refuses it (503 + Retry-After) -- before its body is read (service.runtime.admission);
  2. its images decode in worker threads straight to about the model's input
     size (service.runtime.decoding);
  3. the uint8 pixels go to the backend (service.runtime.backend): our batcher and the
     model in this process, or the batched model service of the split layout;
  4. the endpoint shapes the answer; refusals are 4xx JSON with a reason.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import torch
from pydantic import Field

from model.attribution import MAX_STEPS, AttributionRequest
from model.inference import pick_device
from model.preprocess import DecodeLimits
from service.core import endpoints
from service.runtime import feature_maps as maps
from service.runtime.explain import explain as explain_image
from service.runtime.explain import gradcam as gradcam_image
from service.runtime.admission import TICKET, Admission
from model import store
from service.runtime.backend import (
    ATTRIBUTIONS_AT_ONCE, LocalBackend, ModelVersion, Predictions, RemoteBackend, build_predictor, load_or_exit,
    load_version, locate_model,
)
from service.core.settings import CONFIG, Layout
from service.runtime.decoding import Decoder, decode_seconds_per_byte
from service.core.refusals import Refusal, refusal_for
from service.http.guards import add_guards
from service.core.heap import freeze_startup_heap, limit_malloc_arenas
from service.core.inputs import collect_payloads
from service.http.introspection import introspection_app
from service.oip.app import oip_app
from service.core.metrics import ServiceMetrics
from service.control.control_dir import ControlDir
from service.control.follower import follow_versions
from service.core.schemas import (
    ClassifyResponse, EmbedResponse, ExplainMethod, ExplainResponse, FeatureFormat, FeatureMapsResponse,
    GradCamResponse, ImagePrediction, LabelScore, Stage,
)


limit_malloc_arenas()  # before the worker's threads start (service.core.heap)

# Checked here, at import, in the process that runs `bentoml serve`: a missing
# or corrupt model stops start-up with the reason and a non-zero exit. (Failing
# only inside the worker would make BentoML restart it forever.)
MODEL_PATH, MODEL_TAG = locate_model(CONFIG)
load_or_exit(MODEL_PATH)
LAYOUT = Layout.choose(CONFIG)
if LAYOUT.split:
    from service.runtime.model_service import ModelService


@bentoml.asgi_app(introspection_app, path="/")
@bentoml.asgi_app(oip_app, path="/")  # full /v2/... paths: GET /v2 itself must answer (service.oip.app)
@bentoml.service(
    name="cnn_service",
    workers=LAYOUT.api_workers,
    resources={"cpu": str(os.cpu_count() or 1)},
    traffic={"timeout": CONFIG.request_timeout_s, "max_concurrency": CONFIG.max_concurrency},
    http={"host": "127.0.0.1"},  # loopback unless --host says otherwise (the container does)
    logging={"access": {"skip_paths": ["/metrics", "/healthz", "/livez", "/readyz"]}},
)
class CNNService:
    if LAYOUT.split:
        model_service = bentoml.depends(ModelService)

    def __init__(self) -> None:
        self.ready = False
        self.config = CONFIG
        self.layout = LAYOUT
        self.device = pick_device(CONFIG.device)
        self.metrics = ServiceMetrics("cpu" if LAYOUT.split else self.device.type)
        budget = CONFIG.admission_target * CONFIG.max_latency_ms / 1000
        control = ControlDir.for_this_server()  # what this server's workers share (service.control)
        if LAYOUT.split:
            version = ModelVersion.shape_only(MODEL_TAG, MODEL_PATH)
            self.backend = RemoteBackend(self.model_service, version, CONFIG, self._observe_batch,
                                         lambda outcome: self.metrics.model_worker_retries.labels(outcome).inc())
            initial_rate = 100.0 / LAYOUT.api_workers  # replaced by what it measures within a second of load
        else:
            # Every worker's forward may use every core: alone (low load) it is as fast as one process;
            # busy, the workers share them (BENCHMARKS.md measured 1 vs 2 workers, 1 vs all threads).
            predictor = build_predictor(CONFIG, load_or_exit(MODEL_PATH), self.device, cpu_threads=os.cpu_count() or 1)
            version = ModelVersion.loaded(MODEL_TAG, MODEL_PATH, predictor)
            self.backend = LocalBackend(version, CONFIG, self._observe_batch,
                                        lambda kind, passes, seconds: self.admission.observe_work(kind, passes, seconds),
                                        control=control)
            probe = predictor.predict(torch.zeros(8, 3, predictor.input_size, predictor.input_size,
                                                  dtype=torch.uint8))
            initial_rate = 8 / probe.forward_seconds
            self.metrics.announce_model(version.tag, predictor, self.device.type)
        limits = DecodeLimits(max_bytes=CONFIG.max_image_bytes, max_pixels=CONFIG.max_image_pixels)
        # Each worker measures its own completion rate (service.runtime.admission), so each takes the whole budget.
        # The model's lanes: the batcher's images, the attributions' requests (one per worker: computed
        # one at a time on the machine, the other workers' are next).
        lanes = {"batch": CONFIG.batches_in_flight(self.device.type == "cuda") * CONFIG.max_batch_size,
                 "attribution": ATTRIBUTIONS_AT_ONCE}
        self.admission = Admission(budget, initial_rate, wait_seconds=CONFIG.admission_wait_ms / 1000,
                                   decode_seconds_per_byte=decode_seconds_per_byte(
                                       version.manifest.preprocessing, limits), lanes=lanes)
        self.input_size = version.manifest.preprocessing.input_size  # the same for every version it may move to
        gpu = self.device if self.device.type == "cuda" and CONFIG.gpu_decode != "off" else None
        self.decoder = Decoder(version.manifest.preprocessing, limits, gpu)
        self.versions = follow_versions(self, "api" if LAYOUT.split else "model", version.tag, control)
        if LAYOUT.split:
            self.backend.catch_up = self.versions.step
        freeze_startup_heap()
        self.ready = True
        print(f"serving {self.model_tag} ({self.manifest.preset}, {len(self.manifest.class_names)} classes); "
              f"layout {LAYOUT.describe()}", flush=True)

    # ----- the served version: everything a request draws on comes from one ------------------

    @property
    def version(self) -> ModelVersion:
        """The version this request pinned (service.runtime.backend), or the current one."""
        return self.backend.version()

    @property
    def model_tag(self) -> str:
        return self.version.tag

    @property
    def manifest(self):
        return self.version.manifest

    @property
    def layers(self):
        return self.version.layers

    @property
    def atlas(self):
        return self.version.atlas

    def load(self, tag: str) -> ModelVersion:
        """A version to move to, loaded beside the served one (service.control.follower calls this)."""
        if LAYOUT.split:  # the model worker loads the weights; this worker needs the shape and the atlas
            path, full_tag = store.resolve(tag)
            return ModelVersion.shape_only(full_tag, path)
        return load_version(CONFIG, tag, self.device, self.backend.current.manifest)

    def install(self, version: ModelVersion) -> None:
        if version.predictor is not None:
            self.metrics.announce_model(version.tag, version.predictor, self.device.type)
        self.backend.install(version)

    def __is_ready__(self) -> bool:
        return self.ready

    # ----- public endpoints -------------------------------------------------

    @bentoml.api(route="/classify")
    async def classify(
        self,
        images: list[Path] = Field(default_factory=list),  # no `| None`: BentoML's file fields reject unions
        images_base64: list[str] | None = None,
        top_k: Annotated[int, Field(ge=1, le=1000)] = 5,
    ) -> ClassifyResponse:
        """Top-k classes for each image. Send images as multipart files in the
        field `images` (repeat it for several), or as JSON
        `{"images_base64": ["<base64>", ...], "top_k": 5}`. Requests from many
        clients are batched together on the server."""
        return await self._guarded("classify", self._classify(images, images_base64, top_k))

    @bentoml.api(route="/embed")
    async def embed(
        self,
        images: list[Path] = Field(default_factory=list),  # no `| None`: BentoML's file fields reject unions
        images_base64: list[str] | None = None,
        normalize: bool = True,
    ) -> EmbedResponse:
        """The penultimate-layer (fc7) vector of each image, L2-normalized by
        default: compare images by cosine similarity. Same inputs as /classify."""
        return await self._guarded("embed", self._embed(images, images_base64, normalize))

    @bentoml.api(route="/feature_maps")
    async def feature_maps(
        self,
        image: Path = Field(default=None),  # not Optional: see `images` above
        image_base64: str | None = None,
        layers: list[str] | None = None,
        channels: list[int] | None = None,
        top_channels: Annotated[int | None, Field(ge=1, le=4096)] = None,
        stage: Stage = "post_relu",
        format: FeatureFormat = "png",
    ) -> FeatureMapsResponse:
        """What each layer computes for one image. `layers`: names from GET /model
        (default: every conv layer). `channels`: explicit channel indices, or
        `top_channels`: the N channels with the highest mean activation
        (default: all). `stage`: before or after the ReLU. `format`: `png`
        (a normalized grid per layer), `array` (exact float16 values, base64,
        little-endian, C order) or `stats` (mean, max, fraction of zeros per
        channel). Responses are capped at MAX_FEATURE_MAP_BYTES (8 MiB by
        default): ask for fewer layers or channels beyond that."""
        async def run() -> FeatureMapsResponse:
            request = maps.FeatureMapsRequest(layers, channels, top_channels, stage, format)
            request = request.resolved(self.version.network)

            async def work(pixels: np.ndarray) -> FeatureMapsResponse:
                bodies, size, version = await maps.feature_maps(self, pixels, request)
                self.metrics.feature_map_bytes.labels(format).inc(size)
                return FeatureMapsResponse(model=version.tag, stage=stage, format=format,
                                           input_size=self.input_size, layers=bodies)

            return await self._on_one_image("feature_maps", image, image_base64, work)

        return await self._guarded("feature_maps", run())

    @bentoml.api(route="/gradcam")
    async def gradcam(
        self,
        image: Path = Field(default=None),  # not Optional: see `images` above
        image_base64: str | None = None,
        layer: str | None = None,
        class_index: Annotated[int | None, Field(ge=0)] = None,
    ) -> GradCamResponse:
        """Where the evidence for a class lies in one image (Grad-CAM,
        Selvaraju et al. 2017): the maps of a conv `layer` (default: the last),
        weighted by how much each raises the class score. `class_index`
        (default: the top-1 class) picks the class to explain."""
        request = AttributionRequest("gradcam", class_index, layer)
        return await self._guarded("gradcam", self._attribution("gradcam", image, image_base64, request, gradcam_image))

    @bentoml.api(route="/explain")
    async def explain(
        self,
        image: Path = Field(default=None),  # not Optional: see `images` above
        image_base64: str | None = None,
        method: ExplainMethod = "gradcam",
        class_index: Annotated[int | None, Field(ge=0)] = None,
        layer: str | None = None,
        window: Annotated[int | None, Field(ge=2, le=4096)] = None,
        stride: Annotated[int | None, Field(ge=1, le=4096)] = None,
        steps: Annotated[int, Field(ge=2, le=MAX_STEPS)] = 16,
    ) -> ExplainResponse:
        """Where in one image the evidence for a class lies, by one of the classic methods (through
        Captum): `gradcam` (at a conv `layer`, default the last), `guided_backprop`, `deconvolution`
        (Zeiler & Fergus), `occlusion` (a gray `window` slid with `stride` over the input; at most
        64 positions) or `integrated_gradients` (`steps` points from a gray image). For the top
        class, or `class_index`. Returns the map at the input's size (float16) and a PNG overlay."""
        request = AttributionRequest(method, class_index, layer, window, stride, steps)
        return await self._guarded("explain", self._attribution("explain", image, image_base64, request, explain_image))

    # ----- implementation ---------------------------------------------------

    async def _guarded(self, endpoint: str, work):
        """Run an endpoint's work; refusals (ours, and the model's typed ones) become 4xx answers."""
        self.backend.pin()  # this request's version, from its checks to its answer
        try:
            return await work
        except Exception as err:
            refusal = refusal_for(err, self.config.retry_after_s)
            if refusal is None:
                raise
        self.metrics.refusals.labels(endpoint, refusal.reason).inc()
        return refusal.response()

    async def _attribution(self, endpoint: str, image, image_base64, request: AttributionRequest, respond):
        """/explain and /gradcam: the request resolved (defaults filled in, checked against the model) once,
        before any decoding; admitted at its cost; `respond(service, pixels, request)` shapes the answer."""
        request = request.resolved(self.version.network)

        async def work(pixels: np.ndarray):
            return await respond(self, pixels, request)

        return await self._on_one_image(endpoint, image, image_base64, work, cost=request.cost(self.input_size),
                                        kind=f"explain:{request.method}")

    @contextlib.asynccontextmanager
    async def _admitted(self, endpoint: str, forward_passes: float, encoded_bytes: int = 0, kind: str = "",
                        share: float = 0.0):
        """Charge this request its exact cost and its `share` of the lane of the model the endpoint runs in
        (service.core.endpoints, service.runtime.admission): settle the ticket the door (service.http.guards.AdmitWhenRoom)
        gave it at an estimate, or, where no door ran, admit it here."""
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

    async def _decode(self, endpoint: str, payloads: list[bytes]) -> np.ndarray:
        return await self.decoder.decode(payloads, self.metrics.preprocess_seconds.labels(endpoint, self.metrics.device))

    async def _predict(self, endpoint: str, images, images_base64) -> Predictions:
        payloads = collect_payloads(images, images_base64, True, self.config.max_images_per_request)
        async with self._admitted(endpoint, len(payloads), sum(len(data) for data in payloads), share=len(payloads)):
            with self.backend.batcher.expecting(len(payloads)):  # a deep queue's next batch may wait for them
                pixels = await self._decode(endpoint, payloads)
            return await self.backend.predict(pixels)

    async def _classify(self, images, images_base64, top_k: int) -> ClassifyResponse:
        return self._top_k(await self._predict("classify", images, images_base64), top_k)

    async def _embed(self, images, images_base64, normalize: bool) -> EmbedResponse:
        predicted = await self._predict("embed", images, images_base64)
        embeddings = predicted.embeddings
        if normalize:
            embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        self.metrics.images.labels("embed").inc(len(embeddings))
        return EmbedResponse(model=predicted.version.tag, layer=predicted.version.network.embedding_layer,
                             dim=embeddings.shape[1],
                             normalized=normalize, embeddings=embeddings.tolist())

    async def _on_one_image(self, endpoint: str, image, image_base64, work, cost: int = 1, kind: str = ""):
        """One image (file or base64) through `work(pixels)`: admitted (as `cost` images' worth of
        forward passes, one request in the endpoint's lane), decoded, timed and counted."""
        data = collect_payloads([image] if image else None, [image_base64] if image_base64 else None, False)[0]
        async with self._admitted(endpoint, cost, len(data), kind, share=1):
            pixels = (await self._decode(endpoint, [data]))[0]
            with self.metrics.forward_seconds.labels(endpoint, self.metrics.device).time():
                result = await work(pixels)
        self.metrics.images.labels(endpoint).inc()
        return result

    def _top_k(self, predicted: Predictions, top_k: int) -> ClassifyResponse:
        """The answer of the version that ran the batch: its probabilities, its class names, its tag."""
        probabilities = predicted.probabilities
        k = min(top_k, probabilities.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        names = predicted.version.manifest.class_names
        scores = np.take_along_axis(probabilities, order, axis=1)
        predictions = [
            ImagePrediction(top_k=[LabelScore(label=names[i], index=i, probability=p)
                                   for i, p in zip(row.tolist(), values.tolist())])
            for row, values in zip(order, scores)
        ]
        self.metrics.observe_predictions([names[int(i)] for i in order[:, 0]], scores[:, 0].tolist())
        return ClassifyResponse(model=predicted.version.tag, predictions=predictions)

    def _observe_batch(self, images: int, forward_seconds: float) -> None:
        self.admission.observe_forward(images, forward_seconds)
        if not self.layout.split:  # the model service counts its own batches
            self.metrics.observe_batch(images, forward_seconds)


add_guards(CNNService, CONFIG, LAYOUT)
