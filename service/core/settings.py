"""Service settings, read once from the environment into one typed object,
and the process layout they imply.

Batching defaults are fitted to measured forward latency (BENCHMARKS.md): on
the 2-core development CPU a batch of 32 takes a few milliseconds with the
default small model and 40-70 ms with AlexNet-224 in bf16, ~160 ms in fp32.
A latency budget of 1 s keeps ~30 fp32 AlexNet images in flight there; the
queue is refused (503) beyond that. On a GPU, a batch of 32 AlexNet images
takes milliseconds: lower MAX_LATENCY_MS there to tighten the promise.

Layout (LAYOUT):
  single  one kind of process: each API worker decodes, batches (its own
          batcher, service.runtime.batching) and runs its own copy of the model. The
          fastest on a CPU-only box, where the model and the frontend share
          the same cores anyway (BENCHMARKS.md: split costs ~1 core-ms more
          per image for the hop between processes). One worker per core, up
          to MAX_CPU_WORKERS (each holds a model), each forward free to use
          every core: on the 2-core dev VM two workers served 1.1-1.5x the
          images of one at 32 clients sending JPEGs (the frontend's Python is
          what a single process runs out of first) and one client as fast.
          Where the model dominates instead -- fp32 AlexNet fed tensors over
          OIP -- one worker served 1.16x two (one batcher sees every client:
          batches of 32, not 16; BENCHMARKS.md): set API_WORKERS=1 there.
  split   API workers (decode, validation, responses; as many as the cores
          need) call a model service through `bentoml.depends`: one batched
          model worker per GPU. The frontend, not the GPU, runs out first on
          a GPU box, so it must scale over processes.
  auto    split when CUDA is available, single otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.store import DEFAULT_TAG


class ServiceConfig(BaseSettings):
    """Every setting of the service, each read once from its environment variable (the field's name in
    capitals: MAX_BATCH_SIZE), with its default and its meaning. A value that does not parse stops
    start-up with the variable's name (`from_env`). docs/serving.md's table lists them (a test checks)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_ignore_empty=True, case_sensitive=False)

    model_tag: str = Field(DEFAULT_TAG, description="model to serve from the BentoML model store")
    checkpoint_dir: str | None = Field(None, description="a checkpoint directory to serve instead of the store")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: str = Field("auto", description=(
        "auto: bf16 where the hardware computes it natively and the checkpoint's recorded agreement with fp32 "
        "allows it, else fp32 (model.precision); or fp32 | bf16 | fp16"))
    autocast: str | None = Field(None, exclude=True, description=(
        "deprecated, the old GPU-only setting: read only where PRECISION is unset (bf16 -> auto, off -> fp32)"))
    layout: str = Field("auto", description="auto | single | split (module docstring)")
    api_workers: int = Field(0, description=(
        "0: single -> one per core (up to MAX_CPU_WORKERS); split -> one per core but the model's"))
    model_workers: int = Field(0, description="split: 0 -> one per GPU (1 on a CPU)")
    gpu_decode: str = Field("auto", description="auto: JPEGs decode on the GPU where this process has CUDA; on | off")
    null_model: bool = Field(False, description="benchmark only: a model that costs nothing, to measure the frontend")
    max_batch_size: int = Field(32, ge=1, description="the largest batch of images one forward pass runs")
    max_latency_ms: int = Field(1000, ge=1, description="the latency budget a request is admitted and batched to")
    # Measured at 4x overload (alexnet, 300 ms budget): 0.6 refuses in 28 ms (p95) but admits too little to
    # fill batches (11 ok req/s); 0.85 admits 31 req/s but refusals wait 111 ms behind the decoding it
    # admitted; 0.7: 22 req/s, refusals 36 ms, accepted p99 330-371 ms.
    admission_target: float = Field(0.7, gt=0, description=(
        "admission control aims admitted work at this fraction of MAX_LATENCY_MS; the rest is headroom for "
        "decoding, HTTP and a busy machine's variance"))
    admission_wait_ms: int = Field(150, ge=0, description=(
        "how long a request that does not fit waits at the door for room before its 503: clients that retry at "
        "once then cost one refusal per wait, not thousands a second. Unset: 15% of MAX_LATENCY_MS, so a "
        "request admitted at the end of its wait is still answered within wait + ADMISSION_TARGET = 85% of "
        "the budget"))
    admission_batches: float = Field(0.0, ge=0, description=(
        "the batches' lane: images in flight through the batcher per worker, in full batches; 0: chosen by "
        "where the model runs (`batches_in_flight`)"))
    max_images_per_request: int = Field(64, ge=1, description="images in one request")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body limit (413 above)")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="one encoded image's limit (413 above)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard, read from the header")
    max_feature_map_bytes: int = Field(8 * 1024 * 1024, ge=1, description="cap on one /feature_maps response")
    access_log: Literal["off", "json"] = Field("off", description=(
        "`json`: one JSON line per request on stdout (time, method, route, status, duration, images, model, "
        "trace id, client, body sizes, refusal, stages; never a header or a body); on in the container"))
    tracing_endpoint: str | None = Field(None, description=(
        "an OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces): traces on, a span per stage of each "
        "request; unset: off"))
    tracing_sample_rate: float = Field(0.1, ge=0, le=1, description=(
        "share of traces kept where the client sent no sampling decision (a `traceparent`'s is followed)"))
    low_confidence_below: float = Field(0.5, ge=0, le=1, description=(
        "an answer whose top probability is below this is marked `low_confidence` (JSON and page): "
        "unsure, or an input unlike the model's training data"))
    forward_threads: int = Field(1, ge=1, description="batches in flight at once per model worker")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per forward; 0 = every core")
    max_concurrency: int = Field(256, ge=1, description="requests in flight per API worker before BentoML's 503")
    spread_connections: bool = Field(True, description=(
        "close connections of a worker that serves more than its share of them, so that they spread over the "
        "API workers (service.http.guards.SpreadConnections)"))
    request_timeout_s: int = Field(30, ge=1, description="BentoML's per-request timeout")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of every 503")
    api_key: str | None = Field(None, repr=False,
                                description="when set, every path but the open ones needs it as a Bearer token")
    admin_key: str | None = Field(None, repr=False, description="POST /admin/model (model updates); off when unset")

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        """ADMISSION_WAIT_MS follows MAX_LATENCY_MS where unset; the deprecated AUTOCAST stands in for an
        unset PRECISION; LAYOUT and GPU_DECODE in any case."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("admission_wait_ms") in (None, ""):
            try:
                budget = int(data.get("max_latency_ms") or cls.model_fields["max_latency_ms"].default)
            except (TypeError, ValueError):
                budget = None  # MAX_LATENCY_MS's own check names it
            if budget is not None:
                data["admission_wait_ms"] = budget * 15 // 100
        if not data.get("precision") and data.get("autocast"):
            from model.precision import AUTOCAST_TO_PRECISION

            legacy = str(data["autocast"])
            data["precision"] = AUTOCAST_TO_PRECISION.get(legacy.lower(), legacy)
        for name in ("layout", "gpu_decode"):
            if isinstance(data.get(name), str):
                data[name] = data[name].lower()
        return data

    def batches_in_flight(self, model_on_gpu: bool) -> float:
        """ADMISSION_BATCHES, or: on a GPU, two full batches (one in the model, one decoding and gathering
        on the CPU beside it); on a CPU, 1.25 -- there the decoding takes the very cores the forward
        needs, so a second batch decoding beside the forward only slows it. Measured on the 2-core
        machine, 32 clients x 8 images retrying at once (BENCHMARKS.md, goodput): goodput / the best
        polite load's 0.96-0.97 with 1.25, 0.95 with 1.5, 0.90-0.97 with 2 (ten runs), 0.89 with no
        bound; with 1, batches went out short (28 images of 32)."""
        if self.admission_batches > 0:
            return self.admission_batches
        return 2.0 if model_on_gpu else 1.25

    @classmethod
    def from_env(cls) -> ServiceConfig:
        """The settings of this process's environment; a value that does not parse stops start-up with
        the variable named."""
        try:
            return cls()
        except ValidationError as err:
            problems = "; ".join(f"{'_'.join(map(str, e['loc'])).upper()}={e.get('input')!r}: {e['msg']}"
                                 for e in err.errors())
            raise SystemExit(f"cannot serve: bad setting(s): {problems}") from None

    @classmethod
    def variables(cls) -> dict[str, Any]:
        """Each environment variable the service reads, with its default."""
        return {name.upper(): field.default for name, field in cls.model_fields.items()}


MAX_CPU_WORKERS = 4  # the single layout's default cap: every worker holds a copy of the model


@dataclass(frozen=True)
class Layout:
    split: bool
    api_workers: int
    model_workers: int
    gpus: int

    @classmethod
    def choose(cls, config: ServiceConfig, cores: int | None = None, gpus: int | None = None) -> Layout:
        """The process layout for this machine (cores, visible GPUs) and these settings."""
        cores = cores or os.cpu_count() or 1
        if gpus is None:
            gpus = _visible_gpus(config.device)
        if config.layout not in ("auto", "single", "split"):
            raise ValueError(f"LAYOUT must be auto, single or split, not {config.layout!r}")
        split = config.layout == "split" or (config.layout == "auto" and gpus > 0)
        if not split:
            return cls(False, config.api_workers or min(cores, MAX_CPU_WORKERS), 0, gpus)
        model_workers = config.model_workers or max(1, gpus)
        # Every core but the model workers' (their Python threads feed the GPU) serves HTTP.
        api_workers = config.api_workers or max(1, cores - model_workers)
        return cls(True, api_workers, model_workers, gpus)

    def describe(self) -> dict:
        return {"split": self.split, "api_workers": self.api_workers, "model_workers": self.model_workers,
                "gpus": self.gpus}


def _visible_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


CONFIG = ServiceConfig.from_env()
