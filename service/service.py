"""The BentoML service: the wiring and the public endpoints, and nothing else.

    bentoml serve .            # from the repo root (bentofile.yaml names this class)

A request's way through is the pipeline's (service.runtime.pipeline), whatever the
protocol: admission control admits it at its cost, holds it in line or refuses it
(503 + Retry-After) before its body is read; its images decode straight to about the
model's input size; the uint8 pixels are batched with other requests' and run by the
model, in this process or in the split layout's model service (service.core.settings
explains the two layouts); the endpoint shapes the answer; refusals are 4xx JSON with
a reason. The layers of service/ and what each holds: README.md, "The map of the code".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Awaitable, Callable

import bentoml
import numpy as np
from pydantic import Field

from model.attribution import MAX_STEPS, AttributionRequest
from service.control.control_dir import ControlDir
from service.control.follower import follow_versions
from service.control.rollout_follower import follow_rollouts
from service.core.heap import freeze_startup_heap, limit_malloc_arenas
from service.core import tracing
from service.core.inputs import collect_payloads
from service.core.running import Running
from service.core.schemas import (
    ClassifyResponse, EmbedResponse, ExplainMethod, ExplainResponse, FeatureFormat, FeatureMapsResponse,
    GradCamResponse, Stage,
)
from service.core.settings import CONFIG, Layout
from service.http.guards import add_guards
from service.http.introspection import introspection_app
from service.oip.app import oip_app
from service.runtime import answers
from service.runtime import feature_maps as maps
from service.runtime.model_version import load_or_exit, locate_model
from service.runtime.explain import explain as explain_image
from service.runtime.explain import gradcam as gradcam_image
from service.runtime.pipeline import build_pipeline


limit_malloc_arenas()  # before the worker's threads start (service.core.heap)

# Checked here, at import, in the process that runs `bentoml serve`: a missing
# or corrupt model stops start-up with the reason and a non-zero exit. (Failing
# only inside the worker would make BentoML restart it forever.)
MODEL_PATH, MODEL_TAG = locate_model(CONFIG)
load_or_exit(MODEL_PATH)
LAYOUT = Layout.choose(CONFIG)
if LAYOUT.split:
    from service.runtime.model_service import ModelService
TRACING = tracing.tracing_config(CONFIG.tracing_endpoint, CONFIG.tracing_sample_rate)
if TRACING:
    tracing.drop_message_spans()
RUNNING = Running()  # what the routes and guards BentoML builds apart from the service reach it by


@bentoml.asgi_app(introspection_app(RUNNING), path="/")
@bentoml.asgi_app(oip_app(RUNNING), path="/")  # full /v2/... paths: GET /v2 itself must answer (service.oip.app)
@bentoml.service(
    name="cnn_service",
    workers=LAYOUT.api_workers,
    resources={"cpu": str(os.cpu_count() or 1)},
    traffic={"timeout": CONFIG.request_timeout_s, "max_concurrency": CONFIG.max_concurrency},
    http={"host": "127.0.0.1"},  # loopback unless --host says otherwise (the container does)
    # BentoML's own access log, unless ours (JSON, service.http.observe) replaces it
    logging={"access": {"enabled": CONFIG.access_log != "json", "skip_paths": list(tracing.EXCLUDED_PATHS)}},
    **({"tracing": TRACING} if TRACING else {}),
)
class CNNService:
    if LAYOUT.split:
        model_service = bentoml.depends(ModelService)

    def __init__(self) -> None:
        self.ready = False
        self.config, self.layout = CONFIG, LAYOUT
        tracing.start(TRACING is not None)
        control = ControlDir.for_this_server()  # what this server's workers share (service.control)
        self.pipeline = build_pipeline(CONFIG, LAYOUT, MODEL_PATH, MODEL_TAG, control,
                                       self.model_service if LAYOUT.split else None)
        version = self.pipeline.version
        self.versions = follow_versions(self.pipeline, "api" if LAYOUT.split else "model", version.tag, control)
        follow_rollouts(self.pipeline, self.versions, control, LAYOUT.api_workers + LAYOUT.model_workers,
                        float(CONFIG.request_timeout_s * 4))
        if LAYOUT.split:
            self.pipeline.backend.catch_up = self.versions.step
        freeze_startup_heap()
        RUNNING.service = self
        self.ready = True
        print(f"serving {version.tag} ({version.manifest.preset}, {len(version.manifest.class_names)} classes); "
              f"layout {LAYOUT.describe()}", flush=True)

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
        """Top-k classes for each image, among the served model's classes (GET /model's `card`
        says what it knows: the default model knows 12 synthetic shapes, not photos; an unsure answer
        is marked `low_confidence`). Send images as multipart files in the
        field `images` (repeat it for several), or as JSON
        `{"images_base64": ["<base64>", ...], "top_k": 5}`. Requests from many
        clients are batched together on the server."""
        return await self._guarded("classify", lambda: answers.classify(self.pipeline, self._many(images, images_base64),
                                                                        top_k))

    @bentoml.api(route="/embed")
    async def embed(
        self,
        images: list[Path] = Field(default_factory=list),  # no `| None`: BentoML's file fields reject unions
        images_base64: list[str] | None = None,
        normalize: bool = True,
    ) -> EmbedResponse:
        """The penultimate-layer (fc7) vector of each image, L2-normalized by
        default: compare images by cosine similarity. Same inputs as /classify."""
        return await self._guarded("embed", lambda: answers.embed(self.pipeline, self._many(images, images_base64),
                                                                  normalize))

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
        request = maps.FeatureMapsRequest(layers, channels, top_channels, stage, format)
        return await self._guarded("feature_maps",
                                   lambda: answers.feature_maps(self.pipeline, _one_payload(image, image_base64), request))

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
        return await self._guarded("gradcam", lambda: self._attribution("gradcam", image, image_base64, request,
                                                                        gradcam_image))

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
        return await self._guarded("explain", lambda: self._attribution("explain", image, image_base64, request,
                                                                        explain_image))

    # ----- implementation ---------------------------------------------------

    async def _guarded(self, endpoint: str, answer: Callable[[], Awaitable]):
        """`answer()` on the version it pins, from its checks to its answer; refusals (the inputs'
        too: hence a callable) become their answers (the pipeline's)."""
        self.pipeline.pin()
        try:
            return await answer()
        except Exception as err:
            return self.pipeline.refusal_response(endpoint, err)

    async def _attribution(self, endpoint: str, image, image_base64, request: AttributionRequest, respond):
        """/explain and /gradcam: the request resolved (defaults filled in, checked against the model) once,
        before any decoding; admitted at its cost; `respond(pipeline, pixels, request)` shapes the answer."""
        pipeline = self.pipeline
        request = request.resolved(pipeline.version.network)

        async def work(pixels: np.ndarray):
            return await respond(pipeline, pixels, request)

        return await pipeline.on_one_image(endpoint, _one_payload(image, image_base64), work,
                                           cost=request.cost(pipeline.input_size), kind=f"explain:{request.method}")

    def _many(self, images, images_base64) -> list[bytes]:
        """The images of /classify and /embed: files or base64, at most MAX_IMAGES_PER_REQUEST."""
        return collect_payloads(images, images_base64, True, self.config.max_images_per_request)


def _one_payload(image, image_base64) -> bytes:
    """The one image of /feature_maps, /gradcam and /explain: a file or base64."""
    return collect_payloads([image] if image else None, [image_base64] if image_base64 else None, False)[0]


add_guards(CNNService, CONFIG, LAYOUT, RUNNING)
