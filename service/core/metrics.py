"""The service's own Prometheus metrics, served on /metrics beside BentoML's.

Created when the service starts, not at import: BentoML points
PROMETHEUS_MULTIPROC_DIR at a shared directory inside each worker before it
builds the service, and prometheus_client must see that to aggregate across
worker processes. Names follow Prometheus conventions (base units, `_seconds`,
`_bytes`, `_total`); labels are few and bounded (endpoint, device, reason, and
the model's class names).
"""

from __future__ import annotations

from service.core.endpoints import INFERENCE

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    def __init__(self, device: str):
        import prometheus_client as prom  # imported late on purpose (see module docstring)

        self.device = device
        self._work_metrics(prom)
        self._model_metrics(prom)
        self._capacity_metrics(prom)
        self._rollout_metrics(prom)
        for endpoint in INFERENCE:
            self.images.labels(endpoint.label)  # series exist at 0 from the start: "no traffic" is visible

    def _work_metrics(self, prom) -> None:
        """What the requests asked of the model: batches, forward passes, decoding, images, answers."""
        self.batch_size = prom.Histogram(
            "cnn_batch_size", "Images per model forward pass (adaptive batching across requests).",
            ["device"], buckets=BATCH_BUCKETS,
        )
        self.forward_seconds = prom.Histogram(
            "cnn_model_forward_seconds", "Wall time of one model forward pass.",
            ["endpoint", "device"], buckets=LATENCY_BUCKETS,
        )
        self.preprocess_seconds = prom.Histogram(
            "cnn_preprocess_seconds", "Decode, resize and crop time per image.",
            ["endpoint", "device"], buckets=LATENCY_BUCKETS,
        )
        self.images = prom.Counter("cnn_images_processed_total", "Images accepted and run through the model.",
                                   ["endpoint"])
        self.predictions = prom.Counter("cnn_predictions_total", "Top-1 predictions by class.", ["class_name"])
        self.confidence = prom.Histogram(
            "cnn_top1_confidence", "Probability of the top-1 class (a drift signal when it sinks).",
            buckets=CONFIDENCE_BUCKETS,
        )
        self.feature_map_bytes = prom.Counter(
            "cnn_feature_map_response_bytes_total", "Bytes of feature-map payload returned.", ["format"]
        )
        self.refusals = prom.Counter("cnn_refusals_total", "Requests refused, by endpoint and reason.",
                                     ["endpoint", "reason"])
        # Where the time goes (service.core.timeline): the same buckets on every instance, so that the
        # histograms add up across workers and replicas.
        self.request_seconds = prom.Histogram(
            "cnn_request_duration_seconds", "End to end, from the request's arrival to its response's last byte.",
            ["endpoint", "status"], buckets=LATENCY_BUCKETS,
        )
        self.stage_seconds = prom.Histogram(
            "cnn_request_stage_seconds", "A request's time in each stage: admission, body, parse, decode, "
            "batch_wait, forward (its batch's), answer.", ["endpoint", "stage"], buckets=LATENCY_BUCKETS,
        )
        self.batch_queue = prom.Gauge("cnn_batch_queue_images", "Images waiting for a batch (the queue's depth).",
                                      multiprocess_mode="livesum")

    def _model_metrics(self, prom) -> None:
        """The model a worker serves, its moves, and its model worker's faults."""
        self.model_info = prom.Gauge(
            "cnn_model_info", "The loaded model (value is always 1).",
            ["tag", "preset", "sha256", "device", "dtype"], multiprocess_mode="livemax",
        )
        self._announced: tuple | None = None
        self.model_swaps = prom.Counter("cnn_model_swaps_total",
                                        "Moves of a worker to another model version, by result (ok, refused).",
                                        ["result"])
        self.model_swap_seconds = prom.Histogram(
            "cnn_model_swap_seconds", "Seconds to load, verify, warm up and swap in a model version.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
        )
        for result in ("ok", "refused"):
            self.model_swaps.labels(result)
        self.follower_errors = prom.Counter(
            "cnn_version_follower_errors_total",
            "Errors of a worker's model-version follower (service.control.follower), by exception type; it "
            "logs each and goes on following.", ["error"])
        self.model_worker_retries = prom.Counter(
            "cnn_model_worker_retries_total",
            "Calls to the split layout's model service whose worker died under them, by outcome: answered "
            "by its replacement within the latency budget, or refused (503 model_unavailable).",
            ["outcome"])

    def _capacity_metrics(self, prom) -> None:
        """How full a worker is (admission), and the GPU's memory."""
        # Per worker process; a pod's figure is the sum (images) or the largest (load) over its workers.
        self.inflight_images = prom.Gauge("cnn_inflight_images",
                                          "Work admitted and not yet answered, in single-image forward passes "
                                          "(decoding included: service.runtime.admission).",
                                          multiprocess_mode="livesum")
        self.admission_load = prom.Gauge(
            "cnn_admission_load",
            "Admitted work over what the worker admits -- its cap held to the latency budget, or a lane "
            "of the model's bound (service.runtime.admission), whichever is nearer full (1 = full).",
            multiprocess_mode="livemax",
        )
        self.gpu_allocated = prom.Gauge("cnn_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                                        multiprocess_mode="livemax")
        self.gpu_reserved = prom.Gauge("cnn_gpu_memory_reserved_bytes", "GPU memory reserved by the allocator.",
                                       multiprocess_mode="livemax")
        self.gpu_total = prom.Gauge("cnn_gpu_memory_total_bytes", "GPU memory on the device (0 on a CPU).",
                                    multiprocess_mode="livemax")


    def _rollout_metrics(self, prom) -> None:
        """A rollout (service.control.rollout), per pair of versions: the served one and the candidate."""
        pair = ["served", "candidate"]
        self.rollout_share = prom.Gauge(
            "cnn_rollout_share", "The live rollout stage's share (of requests: shadow; of clients: canary); "
            "0 when none.", [*pair, "mode"], multiprocess_mode="livemax")
        self._rollout_announced: tuple | None = None
        self.rollout_shadow_images = prom.Counter(
            "cnn_rollout_shadow_images_total", "Images a shadow stage computed on the candidate too, by outcome: "
            "the top-1 classes agreed, disagreed, or the shadow work was dropped (under load, or lost).",
            [*pair, "outcome"])
        self.rollout_shift = prom.Histogram(
            "cnn_rollout_probability_shift", "Total-variation distance between the served version's and the "
            "candidate's probabilities for one image (shadow).", pair,
            buckets=(0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0))
        self.rollout_requests = prom.Counter(
            "cnn_rollout_requests_total", "Requests during a rollout stage by who answered them (served or "
            "candidate) and result (ok, error).", [*pair, "mode", "role", "result"])
        self.rollout_seconds = prom.Histogram(
            "cnn_rollout_model_seconds", "The model's part of a request (batch wait and forward) during a rollout, "
            "by version role; shadow: the candidate's copy, at low priority.", [*pair, "mode", "role"],
            buckets=LATENCY_BUCKETS)
        self.rollout_decisions = prom.Counter(
            "cnn_rollout_decisions_total", "Rollouts ended: promoted or rolled_back (by their gates, or a worker "
            "that could not load the candidate), or stopped by the operator.", ["decision"])
        for decision in ("promoted", "rolled_back", "stopped"):
            self.rollout_decisions.labels(decision)

    def announce_rollout(self, plan) -> None:
        """cnn_rollout_share of the live stage this worker takes part in (None: none; the last one's is 0)."""
        labels = (plan.served, plan.candidate, plan.mode) if plan is not None else None
        if self._rollout_announced is not None and self._rollout_announced != labels:
            self.rollout_share.labels(*self._rollout_announced).set(0)
        if labels is not None:
            self.rollout_share.labels(*labels).set(plan.share)
        self._rollout_announced = labels

    def announce_model(self, tag: str, predictor, device_type: str) -> None:
        """cnn_model_info for the version this worker serves (API worker or model worker): 1 for it, 0 for
        the one it replaced (a multiprocess gauge cannot drop a series; alerts read `== 1`)."""
        manifest = predictor.manifest
        labels = (tag, manifest.preset, manifest.weights_sha256, device_type, predictor.dtype_name)
        if self._announced is not None and self._announced != labels:
            self.model_info.labels(*self._announced).set(0)
        self.model_info.labels(*labels).set(1)
        self._announced = labels

    def observe_swap(self, result: str, seconds: float) -> None:
        """A move of this worker to another version: ok, or refused (the old version kept serving)."""
        self.model_swaps.labels(result).inc()
        if result == "ok":
            self.model_swap_seconds.observe(seconds)

    def observe_admission(self, admission) -> None:
        self.inflight_images.set(admission.inflight)
        self.admission_load.set(admission.load())

    def observe_batch(self, size: int, forward_seconds: float) -> None:
        self.batch_size.labels(self.device).observe(size)
        self.forward_seconds.labels("batch", self.device).observe(forward_seconds)

    def observe_request(self, endpoint: str, status: int, seconds: float, stages: dict[str, float]) -> None:
        self.request_seconds.labels(endpoint, str(status)).observe(seconds)
        for stage, stage_seconds in stages.items():
            self.stage_seconds.labels(endpoint, stage).observe(stage_seconds)

    def observe_predictions(self, endpoint: str, top_labels: list[str], top_probabilities: list[float]) -> None:
        """Answered images: how many, and each one's top-1 class and its probability (drift signals)."""
        self.images.labels(endpoint).inc(len(top_labels))
        for label, probability in zip(top_labels, top_probabilities):
            self.predictions.labels(label).inc()
            self.confidence.observe(probability)
