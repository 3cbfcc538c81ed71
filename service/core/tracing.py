"""Traces (OpenTelemetry): BentoML's own tracing, with a span per stage of a request and per batch.

Switched on by TRACING_ENDPOINT (an OTLP/HTTP traces URL), off by default; TRACING_SAMPLE_RATE is the
share of traces kept. BentoML does the protocol's part (`tracing_config` below goes into
`@bentoml.service(tracing=...)`): its ASGI middleware opens a server span per request, continuing a
client's W3C `traceparent` and skipping the excluded paths (probes, /metrics); its sampler follows
the parent's decision, else the ratio; its exporter batches spans to the endpoint. This module adds:

  - a child span per stage of the request's timeline (service.core.timeline: admission, body, parse,
    decode, batch_wait, forward, answer), with its recorded start and end;
  - the request's attributes on its server span (endpoint, images, model version, batch sizes,
    precision, refusal reason);
  - one span per batch ("batch"), linked to every sampled request it serves and made current while
    the forward runs, so that in the split layout the call to the model service carries it and the
    model worker's spans join the same trace.

With tracing off nothing here runs but a check of one module global.
"""

from __future__ import annotations

import contextlib

from service.core.timeline import STAGES, Timeline

EXCLUDED_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")  # probes and scrapes are not traced
_tracer = None  # set by `start` where tracing is on


def tracing_config(endpoint: str | None, sample_rate: float) -> dict | None:
    """BentoML's `tracing` service config for an OTLP/HTTP endpoint (None: tracing off)."""
    if not endpoint:
        return None
    return {"exporter_type": "otlp", "sample_rate": sample_rate,
            "excluded_urls": [path.lstrip("/") for path in EXCLUDED_PATHS],
            "otlp": {"protocol": "http", "endpoint": endpoint}}


def drop_message_spans() -> None:
    """No span per ASGI message (`http receive`, `http send`: four or more a request) under the server
    span: the stage spans say the same, and each span costs the server CPU to make and export.
    OpenTelemetry's ASGI middleware offers `exclude_spans`; BentoML builds it without, so its default is
    set here, before BentoML builds its app (at the service module's import)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    if getattr(OpenTelemetryMiddleware, "_cnn_message_spans_dropped", False):
        return
    build = OpenTelemetryMiddleware.__init__

    def without_message_spans(self, app, *args, exclude_spans=None, **kwargs):
        build(self, app, *args, exclude_spans=exclude_spans or ["receive", "send"], **kwargs)

    OpenTelemetryMiddleware.__init__ = without_message_spans
    OpenTelemetryMiddleware._cnn_message_spans_dropped = True


def start(enabled: bool) -> None:
    """In each worker: our spans come from BentoML's tracer provider, the one its middleware uses (it
    offers no public accessor, hence the container)."""
    global _tracer
    if enabled:
        from bentoml._internal.container import BentoMLContainer

        _tracer = BentoMLContainer.tracer_provider.get().get_tracer("cnn_service")


def current_span_context():
    """The current span's context where it is sampled (recorded and exported), else None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid and context.trace_flags.sampled else None


def trace_id(span_context) -> str | None:
    return None if span_context is None else format(span_context.trace_id, "032x")


def annotate(timeline: Timeline, endpoint: str, status: int, precision: str | None) -> None:
    """The request's attributes on its server span, when its response starts (BentoML's middleware
    ends that span with the response's last byte)."""
    if _tracer is None or timeline.span_context is None:
        return
    from opentelemetry import trace

    attributes = {"cnn.endpoint": endpoint, "cnn.images": timeline.images, "http.response.status_code": status}
    if timeline.model:
        attributes["cnn.model.version"] = timeline.model
    if timeline.batch_sizes:
        attributes["cnn.batch.sizes"] = list(timeline.batch_sizes)
    if precision:
        attributes["cnn.precision"] = precision
    if timeline.refusal:
        attributes["cnn.refusal.reason"] = timeline.refusal
    trace.get_current_span().set_attributes(attributes)


def stage_spans(timeline: Timeline) -> None:
    """The request's stages as child spans of its server span, with their recorded times."""
    if _tracer is None or timeline.span_context is None:
        return
    from opentelemetry import trace

    parent = trace.set_span_in_context(trace.NonRecordingSpan(timeline.span_context))
    for stage, start, end in sorted(timeline.stages, key=lambda s: (s[1], STAGES.index(s[0]))):
        span = _tracer.start_span(stage, context=parent, start_time=timeline.epoch_ns(start),
                                  attributes={"cnn.stage": stage})
        span.end(end_time=timeline.epoch_ns(end))


@contextlib.contextmanager
def batch(timelines: list[Timeline], size: int):
    """A span over one batch's forward, current while it runs: in the trace of the first sampled
    request in it, linked to every sampled request it serves."""
    sampled = [t.span_context for t in timelines if t.span_context is not None] if _tracer is not None else []
    if not sampled:
        yield
        return
    from opentelemetry import trace

    parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]))
    links = [trace.Link(context, {"cnn.link": "request in batch"}) for context in sampled]
    with _tracer.start_as_current_span("batch", context=parent, links=links,
                                       attributes={"cnn.batch.size": size, "cnn.batch.requests": len(timelines)}):
        yield
