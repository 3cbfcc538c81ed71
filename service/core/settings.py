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
from dataclasses import dataclass, field

from model.store import DEFAULT_TAG


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _precision() -> str:
    """PRECISION, or the deprecated AUTOCAST (bf16 -> auto, fp16 -> fp16, off -> fp32) when only it is set."""
    from model.precision import AUTOCAST_TO_PRECISION

    if os.environ.get("PRECISION"):
        return os.environ["PRECISION"]
    legacy = os.environ.get("AUTOCAST")
    return AUTOCAST_TO_PRECISION.get(legacy.lower(), legacy) if legacy else "auto"


@dataclass(frozen=True)
class ServiceConfig:
    model_tag: str = DEFAULT_TAG
    checkpoint_dir: str | None = None  # a checkpoint directory instead of the model store
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 where the hardware computes it natively and the checkpoint's recorded
    # agreement with fp32 allows it, else fp32 (model.precision); or fp32 | bf16 | fp16.
    precision: str = "auto"
    layout: str = "auto"  # auto | single | split (module docstring)
    api_workers: int = 0  # 0: single -> one per core (up to MAX_CPU_WORKERS); split -> one per core but the model's
    model_workers: int = 0  # split: 0 -> one per GPU (1 on a CPU)
    gpu_decode: str = "auto"  # auto: JPEGs decode on the GPU where this process has CUDA; on | off
    null_model: bool = False  # benchmark only: a "model" that costs nothing, to measure the frontend
    max_batch_size: int = 32
    max_latency_ms: int = 1000
    # Admission control aims admitted work at this fraction of max_latency_ms;
    # the rest is headroom for decoding, HTTP and a busy machine's variance.
    # Measured at 4x overload (alexnet, 300 ms budget): 0.6 refuses in 28 ms
    # (p95) but admits too little to fill batches (11 ok req/s); 0.85 admits 31
    # req/s but refusals wait 111 ms behind the decoding it admitted; 0.7: 22
    # req/s, refusals 36 ms, accepted p99 330-371 ms.
    admission_target: float = 0.7
    # A request that does not fit waits this long at the door for room before it is refused
    # (service.runtime.admission): clients that retry at once then cost one refusal per wait, not thousands
    # a second. Default (from_env): 15% of MAX_LATENCY_MS, so a request admitted at the end of its
    # wait is still answered within wait + ADMISSION_TARGET = 85% of the budget.
    admission_wait_ms: int = 150
    # The batches' lane (service.runtime.admission): images in flight through the batcher, per worker, in full
    # batches (MAX_BATCH_SIZE each); more only wait, decoded, at a cost. 0: chosen by where the model
    # runs (`batches_in_flight`).
    admission_batches: float = 0.0
    max_images_per_request: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_feature_map_bytes: int = 8 * 1024 * 1024  # cap on one /feature_maps response
    forward_threads: int = 1  # batches in flight at once per model worker
    torch_threads: int = 0  # intra-op threads per forward; 0 = every core
    max_concurrency: int = 256  # requests in flight per API worker before BentoML answers 503
    # Close connections of a worker that serves more than its share of them, so that they spread over
    # the API workers (service.http.guards.SpreadConnections).
    spread_connections: bool = True
    request_timeout_s: int = 30
    retry_after_s: int = 1
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # POST /admin/model (model updates); off when unset

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
        return cls(
            model_tag=os.environ.get("MODEL_TAG") or DEFAULT_TAG,
            checkpoint_dir=os.environ.get("CHECKPOINT_DIR") or None,
            device=os.environ.get("DEVICE", "auto"),
            precision=_precision(),
            layout=(os.environ.get("LAYOUT") or "auto").lower(),
            api_workers=_int("API_WORKERS", cls.api_workers),
            model_workers=_int("MODEL_WORKERS", cls.model_workers),
            gpu_decode=(os.environ.get("GPU_DECODE") or "auto").lower(),
            null_model=os.environ.get("NULL_MODEL", "") not in ("", "0"),
            max_batch_size=_int("MAX_BATCH_SIZE", cls.max_batch_size),
            max_latency_ms=_int("MAX_LATENCY_MS", cls.max_latency_ms),
            admission_target=float(os.environ.get("ADMISSION_TARGET") or cls.admission_target),
            admission_wait_ms=_int("ADMISSION_WAIT_MS", _int("MAX_LATENCY_MS", cls.max_latency_ms) * 15 // 100),
            admission_batches=float(os.environ.get("ADMISSION_BATCHES") or cls.admission_batches),
            max_images_per_request=_int("MAX_IMAGES_PER_REQUEST", cls.max_images_per_request),
            max_body_bytes=_int("MAX_BODY_BYTES", cls.max_body_bytes),
            max_image_bytes=_int("MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_feature_map_bytes=_int("MAX_FEATURE_MAP_BYTES", cls.max_feature_map_bytes),
            max_concurrency=_int("MAX_CONCURRENCY", cls.max_concurrency),
            spread_connections=os.environ.get("SPREAD_CONNECTIONS", "1") not in ("", "0"),
            forward_threads=_int("FORWARD_THREADS", cls.forward_threads),
            torch_threads=_int("TORCH_THREADS", cls.torch_threads),
            request_timeout_s=_int("REQUEST_TIMEOUT_S", cls.request_timeout_s),
            retry_after_s=_int("RETRY_AFTER_S", cls.retry_after_s),
            api_key=os.environ.get("API_KEY") or None,
            admin_key=os.environ.get("ADMIN_KEY") or None,
        )


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
