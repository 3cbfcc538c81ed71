"""Service settings, read once from the environment into one typed object.

Batching defaults are fitted to measured forward latency on the 2-core CPU
this project is developed on (BENCHMARKS.md): a batch of 32 takes about 15
ms with the default small model and 330-580 ms with AlexNet-224 (the VM's
speed varies), and batches beyond 8 gain little on a CPU. A latency budget of
1 s lets the dispatcher build full batches for the small model and keeps
~30 AlexNet images in flight; the queue is refused (503) beyond that. On a
GPU, a batch of 32 AlexNet images takes milliseconds: lower MAX_LATENCY_MS
there to tighten the latency promise.
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
    max_batch_size: int = 32
    max_latency_ms: int = 1000
    # Admission control aims admitted work at this fraction of max_latency_ms;
    # the rest is headroom for decoding, HTTP and a busy machine's variance.
    # Measured at 4x overload (alexnet, 300 ms budget): 0.6 refuses in 28 ms
    # (p95) but admits too little to fill batches (11 ok req/s); 0.85 admits 31
    # req/s but refusals wait 111 ms behind the decoding it admitted; 0.7: 22
    # req/s, refusals 36 ms, accepted p99 435 ms (330-371 ms once the service
    # froze its start-up heap out of the garbage collector; see service.py).
    admission_target: float = 0.7
    max_images_per_request: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_feature_map_bytes: int = 8 * 1024 * 1024  # cap on one /feature_maps response
    batch_dispatch: str = "auto"  # auto: straight to BentoML's dispatcher; http: through in-process HTTP
    forward_threads: int = 1  # forward passes at once (BentoML `threads` for the batch API)
    torch_threads: int = 0  # intra-op threads per forward; 0 = cores / forward_threads
    max_concurrency: int = 256  # requests in flight per worker before 503
    request_timeout_s: int = 30
    retry_after_s: int = 1
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> ServiceConfig:
        return cls(
            model_tag=os.environ.get("MODEL_TAG") or DEFAULT_TAG,
            checkpoint_dir=os.environ.get("CHECKPOINT_DIR") or None,
            device=os.environ.get("DEVICE", "auto"),
            precision=_precision(),
            max_batch_size=_int("MAX_BATCH_SIZE", cls.max_batch_size),
            max_latency_ms=_int("MAX_LATENCY_MS", cls.max_latency_ms),
            admission_target=float(os.environ.get("ADMISSION_TARGET") or cls.admission_target),
            max_images_per_request=_int("MAX_IMAGES_PER_REQUEST", cls.max_images_per_request),
            max_body_bytes=_int("MAX_BODY_BYTES", cls.max_body_bytes),
            max_image_bytes=_int("MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_feature_map_bytes=_int("MAX_FEATURE_MAP_BYTES", cls.max_feature_map_bytes),
            max_concurrency=_int("MAX_CONCURRENCY", cls.max_concurrency),
            batch_dispatch=os.environ.get("BATCH_DISPATCH") or cls.batch_dispatch,
            forward_threads=_int("FORWARD_THREADS", cls.forward_threads),
            torch_threads=_int("TORCH_THREADS", cls.torch_threads),
            request_timeout_s=_int("REQUEST_TIMEOUT_S", cls.request_timeout_s),
            retry_after_s=_int("RETRY_AFTER_S", cls.retry_after_s),
            api_key=os.environ.get("API_KEY") or None,
        )


CONFIG = ServiceConfig.from_env()
