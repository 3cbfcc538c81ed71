"""For operators: traces to a real OTLP/HTTP receiver, the JSON access log, the latency breakdown and its
PromQL on a real Prometheus -- all from a real `bentoml serve`."""

from __future__ import annotations

import base64
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.core.timeline import STAGES
from testkit.aggregation import alert_expressions, dashboard_expressions
from testkit.images import shape_png
from testkit.metrics import metric_samples, metric_sum
from testkit.prometheus import JOB, PROMETHEUS, Prometheus
from testkit.server import API_KEY
from testkit.wait import wait_until

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def receiver(otlp_receiver):
    return otlp_receiver


@pytest.fixture(scope="module")
def traced(secured_server):
    """Traces on (every trace kept), the JSON access log on, an API key: as an operator would run it
    (conftest.py)."""
    return secured_server


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}", trace_id, parent_id


def classify(url: str, images: int = 1, headers: dict | None = None) -> httpx.Response:
    files = [("images", (f"{i}.png", shape_png(i % 12), "image/png")) for i in range(images)]
    return httpx.post(f"{url}/classify", files=files, headers={**AUTH, **(headers or {})}, timeout=60)


def access_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]


def test_a_request_is_traced_stage_by_stage_continuing_the_clients_trace(traced, receiver):
    header, trace_id, client_span = traceparent()
    response = classify(traced.url, images=2, headers={"traceparent": header})
    assert response.status_code == 200 and response.headers["x-trace-id"] == trace_id
    spans = receiver.wait_for(lambda spans: {"batch", *STAGES} <= {s.name for s in spans if s.trace_id == trace_id})
    trace = [s for s in spans if s.trace_id == trace_id]
    (server_span,) = [s for s in trace if s.parent_id == client_span]  # BentoML's, continuing the client's
    assert server_span.attributes["cnn.endpoint"] == "classify" and server_span.attributes["cnn.images"] == 2
    assert server_span.attributes["cnn.model.version"] == response.json()["model"]
    assert server_span.attributes["cnn.batch.sizes"] == [2] and server_span.attributes["cnn.precision"]
    stages = {s.name: s for s in trace if "cnn.stage" in s.attributes}
    assert set(stages) == set(STAGES)
    for span in stages.values():  # nested in the request, in order
        assert span.parent_id == server_span.span_id
        assert server_span.start_ns <= span.start_ns <= span.end_ns <= server_span.end_ns + 1_000_000
    starts = [stages[name].start_ns for name in STAGES]
    assert starts == sorted(starts)
    (batch,) = [s for s in trace if s.name == "batch"]
    assert (trace_id, server_span.span_id) in batch.links and batch.attributes["cnn.batch.size"] == 2


def test_a_batch_span_is_linked_to_every_request_it_serves(traced, receiver):
    headers = [traceparent() for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda h: classify(traced.url, headers={"traceparent": h[0]}), headers))
    assert all(answer.status_code == 200 for answer in answers)
    trace_ids = {trace_id for _, trace_id, _ in headers}
    spans = receiver.wait_for(lambda spans: trace_ids <= {s.trace_id for s in spans if s.name == "answer"})
    batches = [s for s in spans if s.name == "batch"]
    for _, trace_id, client_span in headers:
        (server_span,) = [s for s in spans if s.trace_id == trace_id and s.parent_id == client_span]
        serving = [b for b in batches if (trace_id, server_span.span_id) in b.links]
        assert len(serving) == 1 and len(serving[0].links) == serving[0].attributes["cnn.batch.requests"]


def test_unsampled_requests_and_probes_leave_no_spans(traced, receiver):
    header, unsampled, _ = traceparent(sampled=False)
    response = classify(traced.url, headers={"traceparent": header})
    assert response.status_code == 200 and "x-trace-id" not in response.headers  # the client's decision kept
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{traced.url}{path}", timeout=30).status_code == 200
    # spans leave in order: once a later request's have arrived, the earlier ones would have
    header, later, _ = traceparent()
    classify(traced.url, headers={"traceparent": header})
    spans = receiver.wait_for(lambda spans: any(s.trace_id == later and s.name == "answer" for s in spans))
    assert not [s for s in spans if s.trace_id == unsampled]
    targets = {str(s.attributes.get("http.target") or s.attributes.get("url.path") or "") for s in spans}
    assert not targets & {"/readyz", "/livez", "/metrics"}
    assert not [s for s in spans if any(p in s.name for p in ("readyz", "livez", "metrics"))]


def test_the_access_log_has_one_json_line_per_request_and_never_the_key_or_the_body(traced):
    image = base64.b64encode(shape_png(5, size=80)).decode()
    header, trace_id, _ = traceparent()
    ok = httpx.post(f"{traced.url}/classify", json={"images_base64": [image], "top_k": 3},
                    headers={**AUTH, "traceparent": header}, timeout=60)
    bad = httpx.post(f"{traced.url}/classify", json={"images_base64": [base64.b64encode(b"not pixels").decode()]},
                     headers=AUTH, timeout=60)
    assert ok.status_code == 200 and bad.status_code == 422
    # each line is written once its response has gone out: read them when both are there
    wait_until(lambda: {trace_id, bad.headers["x-trace-id"]} <= {line["trace_id"] for line in access_lines(traced)},
               30, "both requests' log lines")
    lines = [line for line in access_lines(traced) if line["route"] == "/classify"]
    (logged,) = [line for line in lines if line["trace_id"] == trace_id]
    assert logged["method"] == "POST" and logged["status"] == 200 and logged["images"] == 1
    assert logged["model"] == ok.json()["model"] and logged["client"].startswith("127.0.0.1:")
    assert logged["request_bytes"] > len(image) and logged["response_bytes"] == len(ok.content)
    assert logged["refusal"] is None and 0 < sum(logged["stages_ms"].values()) <= logged["duration_ms"]
    (refused,) = [line for line in lines if line["trace_id"] == bad.headers["x-trace-id"]]
    assert refused["status"] == 422 and refused["refusal"] == bad.json()["error"]
    text = traced.log_path.read_text()
    assert API_KEY not in text and image[:64] not in text  # never the key, never the body


def test_the_breakdown_adds_up_to_no_more_than_what_clients_waited_and_counts_the_batches(traced):
    before = metric_samples(traced.url)
    waited, images = 0.0, [1, 3, 2, 4]
    for count in images:  # one at a time: each request is a batch of its own
        started = time.perf_counter()
        assert classify(traced.url, images=count).status_code == 200
        waited += time.perf_counter() - started
    after = metric_samples(traced.url)

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("cnn_request_duration_seconds_count", endpoint="classify", status="200") == len(images)
    stages = {stage: delta("cnn_request_stage_seconds_sum", endpoint="classify", stage=stage) for stage in STAGES}
    assert all(seconds > 0 for seconds in stages.values()), stages
    assert sum(stages.values()) <= delta("cnn_request_duration_seconds_sum", endpoint="classify") <= waited
    assert delta("cnn_batch_size_count") == len(images) and delta("cnn_batch_size_sum") == sum(images)
    assert metric_sum(after, "cnn_batch_queue_images") == 0  # nothing left waiting


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)")
def test_prometheus_evaluates_the_breakdown_panel_and_the_waiting_alert(traced, tmp_path):
    prometheus = Prometheus(tmp_path, rule_files=())
    try:
        prometheus.set_targets({"a": traced.url.removeprefix("http://")})
        prometheus.wait_for(f'up{{job="{JOB}"}}', lambda r: r and r[0]["value"][1] == "1")
        for _ in range(6):  # across several scrapes, so that rates see the histograms move
            assert classify(traced.url, images=2).status_code == 200
            time.sleep(0.6)
        breakdown, queue = [expr.replace("$__rate_interval", "1m") for expr in dashboard_expressions()
                            if "cnn_request_stage_seconds" in expr or "cnn_batch_queue_images" in expr]
        stages = prometheus.wait_for(breakdown, lambda r: len(r) == len(STAGES))
        assert {r["metric"]["stage"] for r in stages} == set(STAGES)
        assert all(float(r["value"][1]) >= 0 for r in stages)
        assert prometheus.query(queue)[0]["value"][1] == "0"
        waiting = alert_expressions()["CNNServiceWaitingDominates"]
        assert prometheus.query(waiting.split(" > ")[0]) and not prometheus.query(waiting)  # evaluates; idle: no alert
    finally:
        prometheus.stop()


def test_in_the_split_layout_the_model_workers_spans_join_the_trace(split_server, receiver):
    header, trace_id, _ = traceparent()
    response = httpx.post(f"{split_server.url}/classify", files=[("images", ("a.png", shape_png(2), "image/png"))],
                          headers={"traceparent": header}, timeout=60)
    assert response.status_code == 200 and response.headers["x-trace-id"] == trace_id
    spans = receiver.wait_for(lambda spans: {"cnn_service", "cnn_model"}
                              <= {s.service for s in spans if s.trace_id == trace_id})
    trace = {s.span_id: s for s in spans if s.trace_id == trace_id}
    (batch,) = [s for s in trace.values() if s.name == "batch"]
    model_side = [s for s in trace.values() if s.service == "cnn_model"
                  and (s.parent_id not in trace or trace[s.parent_id].service == "cnn_service")]
    assert model_side  # the model worker's server span, under the API worker's call
    ancestor = model_side[0]
    while ancestor.parent_id in trace and ancestor.span_id != batch.span_id:
        ancestor = trace[ancestor.parent_id]
    assert ancestor.span_id == batch.span_id  # ... made from within the batch's span
