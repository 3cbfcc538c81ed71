"""The outermost guard: every request's timeline, read three ways when its response is sent.

  - the latency breakdown (service.core.metrics): each stage's seconds and the end-to-end seconds by
    endpoint and status, for the endpoints that run the model;
  - the trace (service.core.tracing): a span per stage under BentoML's server span, the request's
    attributes on it, and its trace id back in the `X-Trace-Id` response header;
  - the access log: one JSON line per request on stdout (ACCESS_LOG=json), with no header and no body
    in it -- so never the API key, nor an image.

Probes and /metrics are left alone: no timeline, no span, no log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

from service.core import endpoints, timeline, tracing
from service.core.running import Running

UNOBSERVED = frozenset(tracing.EXCLUDED_PATHS)
TRACE_HEADER = b"x-trace-id"
CLIENT_HEADER = b"x-client-id"


def access_logger() -> logging.Logger:
    """The `cnn.access` logger: bare JSON lines on stdout, apart from BentoML's own log format."""
    logger = logging.getLogger("cnn.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class ObserveRequests:
    def __init__(self, app, running: Running, access_log: bool):
        self.app = app
        self.running = running
        self.log = access_logger() if access_log else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in UNOBSERVED:
            return await self.app(scope, receive, send)
        request = timeline.Timeline(scope.get("method", ""), scope.get("path", ""), client=client_id(scope))
        request.span_context = tracing.current_span_context()
        token = timeline.CURRENT.set(request)
        sizes = {"request": 0, "response": 0}
        status, ended = 500, None

        async def counting_receive():
            message = await receive()
            sizes["request"] += len(message.get("body", b""))
            return message

        async def observing_send(message):
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                self._annotate(request, status)
                if request.span_context is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (TRACE_HEADER, tracing.trace_id(request.span_context).encode())]}
            elif message["type"] == "http.response.body":
                sizes["response"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    ended = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, counting_receive, observing_send)
        finally:
            timeline.CURRENT.reset(token)
            self._observe(request, scope, status, ended or time.perf_counter(), sizes)

    def _annotate(self, request: timeline.Timeline, status: int) -> None:
        if request.span_context is None:
            return
        endpoint, pipeline = endpoints.find(request.path), self.running.pipeline
        tracing.annotate(request, endpoint.label if endpoint else request.path, status,
                         pipeline.precision_name if pipeline is not None else None)

    def _observe(self, request: timeline.Timeline, scope, status: int, ended: float, sizes: dict) -> None:
        request.finish(ended)
        endpoint = endpoints.find(request.path)
        pipeline = self.running.pipeline
        if pipeline is not None and endpoint is not None and endpoint.sheddable:
            pipeline.metrics.observe_request(endpoint.label, status, ended - request.started, request.seconds())
            pipeline.metrics.batch_queue.set(pipeline.backend.batcher.queued)
        tracing.stage_spans(request)
        if self.log is not None:
            self.log.info(json.dumps(access_record(request, scope, endpoint, status, ended, sizes),
                                     separators=(",", ":")))


def client_id(scope) -> str:
    """The client, as a rollout's canary keeps it: its X-Client-Id header, else its address (no port)."""
    for name, value in scope.get("headers", ()):
        if name == CLIENT_HEADER:
            return value.decode("latin-1")[:200]
    client = scope.get("client")
    return client[0] if client else ""


def access_record(request: timeline.Timeline, scope, endpoint, status: int, ended: float, sizes: dict) -> dict:
    """One access-log line's fields (documented in docs/operations.md, "Access log")."""
    client = scope.get("client")
    return {
        "time": datetime.fromtimestamp(request.started_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
        "method": request.method,
        "route": endpoint.path if endpoint is not None else request.path,
        "path": request.path,
        "status": status,
        "duration_ms": round((ended - request.started) * 1000, 3),
        "images": request.images,
        "model": request.model,
        "trace_id": tracing.trace_id(request.span_context),
        "client": f"{client[0]}:{client[1]}" if client else None,
        "request_bytes": sizes["request"],
        "response_bytes": sizes["response"],
        "refusal": request.refusal,
        "stages_ms": {stage: round(seconds * 1000, 3) for stage, seconds in request.seconds().items()},
    }
