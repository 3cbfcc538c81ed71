"""The BentoML service: classification, embeddings, feature maps, introspection.

    bentoml serve .            # from the repo root (bentofile.yaml names this class)

Request flow for /classify and /embed:
  1. the endpoint reads the images (multipart files or base64 JSON) and
     decodes them in a thread pool -- off the event loop, in parallel;
  2. it hands the decoded uint8 tensors to the batched forward through
     BentoML's own adaptive batching: the tensors wait in this process under
     random tickets, and the endpoint gives the tickets to the dispatcher of
     the batchable API `forward_batch` (directly; or, as a fallback, through
     an in-process HTTP client on the service's own ASGI app). BentoML's
     dispatcher merges the tickets of concurrent requests into one batch
     (up to max_batch_size, within max_latency_ms) and sheds what would miss
     the latency budget with a 503;
  3. one forward pass gives probabilities and the fc7 embedding together.
Only tickets cross to the dispatcher, never pixels or pickles.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import secrets
import time
from pathlib import Path
from typing import Annotated

import anyio
import bentoml
import httpx
import torch
from bentoml.exceptions import ServiceUnavailable
from pydantic import Field

from model.checkpoint import CheckpointError, load_checkpoint
from model.inference import Predictor, configure_cpu_threads, pick_device
from model.preprocess import DecodeLimits, ImageRejected, load_image
from model.summary import layer_table
from model.visualize import encode_png, heatmap_rgba
from service.admission import Admission
from service.config import CONFIG
from service.errors import Refusal
from service.feature_maps import choose_channels, estimated_bytes, float16_payload, layer_payload
from service.inputs import collect_payloads
from service.introspection import introspection_app
from service.metrics import ServiceMetrics
from service.middleware import GuardMiddleware
from service.schemas import (
    ClassifyResponse, EmbedResponse, FeatureFormat, FeatureMapsResponse, GradCamResponse,
    ImagePrediction, LabelScore, Stage,
)


def freeze_startup_heap() -> None:
    """Exempt everything built at start-up from Python's cyclic garbage collector.

    The imports, the model and BentoML's app are ~470,000 long-lived objects. A
    full (generation 2) collection walks them all while holding the GIL: here it
    took 220 ms, during which the event loop answered nobody and the forward
    thread stopped -- the slowest accepted requests under load were exactly
    those. Frozen objects are never walked again (they live as long as the
    process anyway), so later collections only see the objects requests create.
    """
    gc.collect()
    gc.freeze()


def _locate_model() -> tuple[Path, str]:
    if CONFIG.checkpoint_dir:
        return Path(CONFIG.checkpoint_dir), f"dir:{Path(CONFIG.checkpoint_dir).name}"
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(CONFIG.model_tag)
    except (NotFound, ValueError) as err:
        raise SystemExit(
            f"cannot serve: model {CONFIG.model_tag!r} is not in the BentoML model store ({err}). "
            "Train and register one with `make default-model`, or set CHECKPOINT_DIR."
        ) from None
    return Path(stored.path), str(stored.tag)


def _load_or_exit(path: Path):
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"cannot serve: the model is missing, corrupt or incomplete: {err}") from None


# Checked here, at import, in the process that runs `bentoml serve`: a missing
# or corrupt model stops start-up with the reason and a non-zero exit. (Failing
# only inside the worker would make BentoML restart it forever.)
MODEL_PATH, MODEL_TAG = _locate_model()
_load_or_exit(MODEL_PATH)

FORWARD_ROUTE = "/internal/forward_batch"
# Lets the in-process HTTP fallback of `_submit` through the guard on /internal/.
INTERNAL_TOKEN = secrets.token_urlsafe(32)
_WANTS_GPU = CONFIG.device.startswith("cuda") or (CONFIG.device == "auto" and torch.cuda.is_available())


@bentoml.asgi_app(introspection_app, path="/")
@bentoml.service(
    name="cnn_service",
    workers=1,  # one process owns the model; torch spreads each forward over every core
    threads=CONFIG.forward_threads,  # batches in flight at once (see ServiceConfig)
    resources={"gpu": 1} if _WANTS_GPU else {"cpu": str(os.cpu_count() or 1)},
    traffic={"timeout": CONFIG.request_timeout_s, "max_concurrency": CONFIG.max_concurrency},
    http={"host": "127.0.0.1"},  # loopback unless --host says otherwise (the container does)
    # The in-process batching hop is an implementation detail: one access-log line per client request.
    logging={"access": {"skip_paths": ["/metrics", "/healthz", "/livez", "/readyz", FORWARD_ROUTE]}},
)
class CNNService:
    def __init__(self) -> None:
        self.ready = False
        self.config = CONFIG
        device = pick_device(CONFIG.device)
        if device.type == "cpu":
            configure_cpu_threads(CONFIG.torch_threads or max(1, (os.cpu_count() or 1) // CONFIG.forward_threads))
        self.model_tag = MODEL_TAG
        checkpoint = _load_or_exit(MODEL_PATH)
        self.predictor = Predictor(checkpoint, device, CONFIG.precision, parallel=CONFIG.forward_threads)
        self.manifest = checkpoint.manifest
        self.layers = {row.name: row for row in layer_table(checkpoint.model)}
        self.metrics = ServiceMetrics(device.type)
        self.metrics.model_info.labels(
            self.model_tag, self.manifest.preset, self.manifest.weights_sha256, device.type, self.predictor.dtype_name
        ).set(1)
        self.limits = DecodeLimits(max_bytes=CONFIG.max_image_bytes, max_pixels=CONFIG.max_image_pixels)
        self._decode_slots = anyio.CapacityLimiter(max(2, os.cpu_count() or 1))
        self._pending: dict[str, torch.Tensor] = {}
        self._results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._client: httpx.AsyncClient | None = None
        self._dispatch = None
        self.dispatch_path = "unresolved"
        self.warmup_seconds = self.predictor.warm_up((1, min(8, CONFIG.max_batch_size)))
        probe = self.predictor.predict(torch.zeros(8, 3, self.predictor.input_size, self.predictor.input_size,
                                                   dtype=torch.uint8))
        self.admission = Admission(CONFIG.admission_target * CONFIG.max_latency_ms / 1000,
                                   8 / probe.forward_seconds)
        self._update_gpu_gauges()
        freeze_startup_heap()
        self.ready = True
        print(f"serving {self.model_tag} ({self.manifest.preset}, {len(self.manifest.class_names)} classes) on "
              f"{device} in {self.predictor.precision.name} ({self.predictor.precision.reason}); "
              f"warm-up {self.warmup_seconds:.2f}s", flush=True)

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
        return await self._guarded(
            "feature_maps", self._feature_maps(image, image_base64, layers, channels, top_channels, stage, format)
        )

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
        return await self._guarded("gradcam", self._gradcam(image, image_base64, layer, class_index))

    # ----- the batched forward (internal) -------------------------------------

    @bentoml.api(
        route=FORWARD_ROUTE,
        batchable=True,
        max_batch_size=CONFIG.max_batch_size,
        max_latency_ms=CONFIG.max_latency_ms,
    )
    def forward_batch(self, tickets: list[str]) -> list[str]:
        """Internal: runs the model on images waiting under these tickets.
        Unknown tickets are ignored (returned as ""), so a stray caller cannot
        fail a batch that carries other clients' images."""
        known = [t for t in tickets if t in self._pending]
        if known:
            output = self.predictor.predict(torch.stack([self._pending.pop(t) for t in known]))
            for i, ticket in enumerate(known):
                self._results[ticket] = (output.probabilities[i], output.embeddings[i])
            self.metrics.observe_batch(len(known), output.forward_seconds)
            self.admission.observe(len(known), output.forward_seconds)
            self._update_gpu_gauges()
        return [t if t in self._results else "" for t in tickets]

    # ----- implementation ---------------------------------------------------

    async def _guarded(self, endpoint: str, work):
        try:
            return await work
        except Refusal as refusal:
            self.metrics.refusals.labels(endpoint, refusal.reason).inc()
            return refusal.response()

    async def _classify(self, images, images_base64, top_k: int) -> ClassifyResponse:
        probabilities, _ = await self._run_batched("classify", images, images_base64)
        k = min(top_k, probabilities.shape[1])
        top = probabilities.topk(k, dim=1)
        names = self.manifest.class_names
        predictions = [
            ImagePrediction(top_k=[
                LabelScore(label=names[i], index=i, probability=p)
                for p, i in zip(values.tolist(), indices.tolist())
            ])
            for values, indices in zip(top.values, top.indices)
        ]
        self.metrics.observe_predictions(
            "classify", [names[int(i)] for i in top.indices[:, 0]], top.values[:, 0].tolist()
        )
        return ClassifyResponse(model=self.model_tag, predictions=predictions)

    async def _embed(self, images, images_base64, normalize: bool) -> EmbedResponse:
        _, embeddings = await self._run_batched("embed", images, images_base64)
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        self.metrics.images.labels("embed").inc(len(embeddings))
        return EmbedResponse(
            model=self.model_tag, layer=self.predictor.model.embedding_layer, dim=embeddings.shape[1],
            normalized=normalize, embeddings=embeddings.tolist(),
        )

    async def _run_batched(self, endpoint: str, images, images_base64) -> tuple[torch.Tensor, torch.Tensor]:
        payloads = collect_payloads(images, images_base64, True, self.config.max_images_per_request)
        async with self._admitted(len(payloads)):
            tensors = await self._decode_all(endpoint, payloads)
            tickets = [secrets.token_urlsafe(16) for _ in tensors]
            self._pending.update(zip(tickets, tensors))
            try:
                await self._submit(tickets)
                results = [self._results.pop(t) for t in tickets]
            finally:
                for ticket in tickets:  # a cancelled or failed request leaves nothing behind
                    self._pending.pop(ticket, None)
                    self._results.pop(ticket, None)
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

    @contextlib.asynccontextmanager
    async def _admitted(self, images: int):
        if not self.admission.try_admit(images):
            raise Refusal(503, "overloaded", "the model is at capacity; retry shortly",
                          {"Retry-After": str(self.config.retry_after_s)})
        try:
            yield
        finally:
            self.admission.release(images)

    async def _submit(self, tickets: list[str]) -> None:
        """Send tickets through BentoML's batching dispatcher for `forward_batch`.

        Fast path: hand them straight to the dispatcher of the running app
        (BentoML's own `batch_infer`, found on the route it built for
        FORWARD_ROUTE), which skips an HTTP round of parsing, middleware and
        JSON per request. If this BentoML version is laid out differently (or
        BATCH_DISPATCH=http), the same call goes over in-process HTTP instead;
        tests pin which path runs, and run both.
        """
        if self._dispatch is None:
            direct = self._find_dispatcher() if self.config.batch_dispatch == "auto" else None
            self._dispatch = direct or self._dispatch_over_http
        try:
            await self._dispatch(tickets)
        except ServiceUnavailable:  # the dispatcher predicts a miss of max_latency_ms
            raise Refusal(503, "overloaded_queue", "the model's queue is full; retry shortly",
                          {"Retry-After": str(self.config.retry_after_s)}) from None

    def _find_dispatcher(self):
        app = getattr(self.to_async, "app", None)
        for route in getattr(app, "routes", []):
            endpoint = getattr(route, "endpoint", None)
            factory = getattr(getattr(endpoint, "func", None), "__self__", None)
            if getattr(route, "path", None) == FORWARD_ROUTE and hasattr(factory, "batch_infer"):
                self.dispatch_path = "dispatcher"
                return lambda tickets: factory.batch_infer("forward_batch", (tickets,), {})
        return None

    async def _dispatch_over_http(self, tickets: list[str]) -> None:
        if self._client is None:
            self.dispatch_path = "http"
            self._client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.to_async.app), base_url="http://cnn-service.internal",
                timeout=self.config.request_timeout_s, headers={"x-internal-token": INTERNAL_TOKEN},
            )
        response = await self._client.post(FORWARD_ROUTE, json={"tickets": tickets})
        if response.status_code == 503:
            raise ServiceUnavailable("process is overloaded")
        response.raise_for_status()

    async def _decode_all(self, endpoint: str, payloads: list[bytes]) -> list[torch.Tensor]:
        """Decode every image in parallel threads; the first bad image (by position) refuses the request."""
        decoded: list[torch.Tensor | None] = [None] * len(payloads)
        refusals: dict[int, Refusal] = {}

        async def decode(index: int, data: bytes) -> None:
            start = time.perf_counter()
            try:
                decoded[index] = await anyio.to_thread.run_sync(
                    load_image, data, self.manifest.preprocessing, self.limits, limiter=self._decode_slots
                )
            except ImageRejected as err:
                status = 413 if err.reason == "too_many_bytes" else 422
                where = f"image {index}: " if len(payloads) > 1 else ""
                refusals[index] = Refusal(status, err.reason, f"{where}{err}")
                return
            self.metrics.preprocess_seconds.labels(endpoint, self.metrics.device).observe(
                time.perf_counter() - start
            )

        async with anyio.create_task_group() as group:
            for index, data in enumerate(payloads):
                group.start_soon(decode, index, data)
        if refusals:
            raise refusals[min(refusals)]
        return decoded  # type: ignore[return-value]

    async def _feature_maps(self, image, image_base64, layers, channels, top_channels, stage, fmt):
        names = list(dict.fromkeys(layers)) if layers else [
            n for n, row in self.layers.items() if row.type == "conv"
        ]
        unknown = [n for n in names if n not in self.predictor.model.named_layers]
        if unknown:
            raise Refusal(422, "unknown_layer",
                          f"unknown layer(s) {unknown[:10]}; valid: {list(self.predictor.model.named_layers)}")
        if channels is not None and top_channels is not None:
            raise Refusal(400, "ambiguous_channels", "give `channels` or `top_channels`, not both")
        activations = await self._run_on_one_image(
            "feature_maps", image, image_base64, self.predictor.activations, names, stage)
        chosen = {n: choose_channels(n, activations[n], channels, top_channels) for n in names}
        size = estimated_bytes(activations, chosen, fmt)
        if size > self.config.max_feature_map_bytes:
            raise Refusal(422, "response_too_large",
                          f"about {size:,} bytes of {fmt}; the cap is {self.config.max_feature_map_bytes:,}: "
                          "ask for fewer layers, `channels` or `top_channels`")
        bodies = await anyio.to_thread.run_sync(
            lambda: [layer_payload(self.layers[n], activations[n], chosen[n], fmt) for n in names]
        )
        response = FeatureMapsResponse(model=self.model_tag, stage=stage, format=fmt,
                                       input_size=self.predictor.input_size, layers=bodies)
        payload_bytes = sum(len(b.png or "") + len(b.array.data if b.array else "") for b in bodies)
        self.metrics.feature_map_bytes.labels(fmt).inc(payload_bytes)
        return response

    async def _gradcam(self, image, image_base64, layer, class_index) -> GradCamResponse:
        convs = [n for n, row in self.layers.items() if row.type == "conv"]
        layer = layer or convs[-1]
        if layer not in convs:
            raise Refusal(422, "unknown_layer", f"Grad-CAM needs a conv layer; {layer!r} is not one of {convs}")
        classes = self.manifest.class_names
        if class_index is not None and class_index >= len(classes):
            raise Refusal(422, "class_out_of_range", f"class_index must be in 0..{len(classes) - 1}")
        cam = await self._run_on_one_image("gradcam", image, image_base64, self.predictor.grad_cam, layer, class_index)
        png = await anyio.to_thread.run_sync(lambda: encode_png(heatmap_rgba(cam.heatmap)))
        row = self.layers[layer]
        return GradCamResponse(
            model=self.model_tag, layer=layer, class_index=cam.class_index, label=classes[cam.class_index],
            probability=cam.probability, input_size=self.predictor.input_size, layer_map=float16_payload(cam.layer_map),
            receptive_field=row.receptive_field, jump=row.jump, heatmap_png=base64.b64encode(png).decode(),
        )

    async def _run_on_one_image(self, endpoint: str, image, image_base64, work, *args):
        """One image (file or base64) through `work(uint8 tensor, *args)` in a worker thread:
        admitted, decoded, timed and counted like every inference."""
        data = collect_payloads([image] if image else None, [image_base64] if image_base64 else None, False)[0]
        async with self._admitted(1):
            tensor = (await self._decode_all(endpoint, [data]))[0]
            start = time.perf_counter()
            result = await anyio.to_thread.run_sync(work, tensor, *args)
        self.metrics.forward_seconds.labels(endpoint, self.metrics.device).observe(time.perf_counter() - start)
        self.metrics.images.labels(endpoint).inc()
        return result

    def _update_gpu_gauges(self) -> None:
        memory = self.predictor.gpu_memory()
        if memory is not None:
            self.metrics.gpu_allocated.set(memory[0])
            self.metrics.gpu_reserved.set(memory[1])
            self.metrics.gpu_total.set(memory[2])


CNNService.add_asgi_middleware(
    GuardMiddleware, max_body_bytes=CONFIG.max_body_bytes, api_key=CONFIG.api_key,
    retry_after_s=CONFIG.retry_after_s, internal_token=INTERNAL_TOKEN,
)
