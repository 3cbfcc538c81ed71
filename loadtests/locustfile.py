"""Locust users for the real traffic mix. Every task checks the response body,
not just the status code.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000

Tunable through the environment:
  LOCUST_WEIGHTS="inference=6,inspector=1,embedding=2,attribution=1"   relative share of each user class
  LOCUST_WAIT="0.1,0.5"                                  seconds between a user's requests (min,max)
  LOCUST_THROUGHPUT=6.0                                  or: each user paces itself to this many requests/s
  LOCUST_HONOR_RETRY_AFTER=1                             a shed user waits Retry-After seconds, as
                                                         well-behaved clients do
  LOCUST_CLIENT_IDS=256                                  each request as one of that many clients
                                                         (X-Client-Id: a rollout's canary is per client)
A 503 that carries Retry-After is counted as "shed" (the service protecting its
latency budget); anything else that is not the expected body is an error.
The per-endpoint outcome and latency summary is written to
$LOCUST_SUMMARY (JSON) when the run ends, for the SLO gates.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections import defaultdict

import gevent
from locust import FastHttpUser, between, constant_throughput, events, task
from urllib3 import encode_multipart_formdata

from testkit.images import request_pool

IMAGES = request_pool()
SHAPES = [image for image in IMAGES if image.name.startswith("shape_")]


def _weights() -> dict[str, int]:
    weights = {"inference": 6, "inspector": 1, "embedding": 2, "attribution": 1}
    for item in filter(None, os.environ.get("LOCUST_WEIGHTS", "").split(",")):
        name, _, value = item.partition("=")
        weights[name.strip()] = int(value)
    return weights


def _wait():
    if os.environ.get("LOCUST_THROUGHPUT"):  # open-loop-like: each user paces itself to N requests/s
        return constant_throughput(float(os.environ["LOCUST_THROUGHPUT"]))
    low, _, high = os.environ.get("LOCUST_WAIT", "0.1,0.5").partition(",")
    return between(float(low), float(high or low))


WEIGHTS = _weights()
HONOR_RETRY_AFTER = os.environ.get("LOCUST_HONOR_RETRY_AFTER", "") not in ("", "0")
# Model updates (loadtests.update): the versions allowed to answer, and a timeline of latencies.
MODELS = set(filter(None, os.environ.get("LOCUST_MODELS", "").split(",")))
CLIENT_IDS = int(os.environ.get("LOCUST_CLIENT_IDS", "0") or 0)
TIMELINE = os.environ.get("LOCUST_TIMELINE", "") not in ("", "0")


class Outcomes:
    """Latency and outcome per endpoint, split by ok / shed / error."""

    def __init__(self):
        self.latencies: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.started = time.time()
        self.models: dict[str, int] = defaultdict(int)  # answers by the model version that gave them
        self.timeline: list[tuple[float, float, str]] = []  # (unix time, ms, outcome), with LOCUST_TIMELINE

    def record(self, name: str, outcome: str, milliseconds: float, model: str | None = None) -> None:
        self.latencies[(name, outcome)].append(milliseconds)
        if model is not None:
            self.models[model] += 1
        if TIMELINE:
            self.timeline.append((time.time(), milliseconds, outcome))

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        endpoints: dict[str, dict] = defaultdict(lambda: {"ok": 0, "shed": 0, "error": 0})
        for (name, outcome), values in self.latencies.items():
            entry = endpoints[name]
            entry[outcome] = len(values)
            entry[f"{outcome}_p50_ms"] = pct(values, 0.50)
            entry[f"{outcome}_p95_ms"] = pct(values, 0.95)
            entry[f"{outcome}_p99_ms"] = pct(values, 0.99)
            entry[f"{outcome}_max_ms"] = max(values)
        return {"seconds": time.time() - self.started, "endpoints": dict(endpoints), "models": dict(self.models),
                "timeline": self.timeline}


OUTCOMES = Outcomes()


@events.quitting.add_listener
def _write_summary(environment, **_):
    path = os.environ.get("LOCUST_SUMMARY")
    if path:
        with open(path, "w") as out:
            json.dump(OUTCOMES.summary(), out, indent=2)


class _Checked(FastHttpUser):
    """FastHttpUser: geventhttpclient costs a fraction of `requests`' CPU per call,
    which matters when the load generator shares the machine with the service."""

    abstract = True
    network_timeout = 60.0
    connection_timeout = 10.0
    wait_time = _wait()

    def _post(self, name: str, check, files: list | None = None, **kwargs) -> None:
        if files is not None:  # FastHttpUser (geventhttpclient) has no `files=`: encode multipart here
            kwargs["data"], content_type = encode_multipart_formdata(files)
            kwargs["headers"] = {"Content-Type": content_type}
        if CLIENT_IDS:
            kwargs["headers"] = {**kwargs.get("headers", {}), "X-Client-Id": f"client-{random.randrange(CLIENT_IDS)}"}
        start = time.perf_counter()
        with self.client.post(f"/{name.split(':')[0]}", name=name, catch_response=True, **kwargs) as resp:
            elapsed = (time.perf_counter() - start) * 1000
            if resp.status_code == 503 and resp.headers.get("Retry-After"):
                OUTCOMES.record(name, "shed", elapsed)
                resp.failure("shed: 503 with Retry-After")
                if HONOR_RETRY_AFTER:
                    gevent.sleep(float(resp.headers["Retry-After"]))
                return
            problem, model = None, None
            if resp.status_code != 200:
                problem = f"status {resp.status_code}: {resp.text[:200]}"
            else:
                try:
                    body = resp.json()
                    model = body.get("model")
                    problem = check(body)
                    if MODELS and model not in MODELS:
                        problem = f"answered by {model!r}, not one of {sorted(MODELS)}"
                except (ValueError, KeyError, TypeError, IndexError) as err:
                    problem = f"bad body: {type(err).__name__}: {err}"
            if problem:
                OUTCOMES.record(name, "error", elapsed, model)
                resp.failure(problem)
            else:
                OUTCOMES.record(name, "ok", elapsed, model)
                resp.success()


def _check_predictions(count: int, top_k: int):
    def check(body: dict) -> str | None:
        predictions = body["predictions"]
        if len(predictions) != count:
            return f"{len(predictions)} predictions for {count} images"
        for prediction in predictions:
            scores = [entry["probability"] for entry in prediction["top_k"]]
            if len(scores) != top_k or scores != sorted(scores, reverse=True) or not 0 <= scores[-1] <= scores[0] <= 1:
                return f"bad top-k: {prediction['top_k']}"
        return None

    return check


class InferenceClient(_Checked):
    """Classification clients: single and multi-image, multipart and JSON."""

    weight = WEIGHTS["inference"]

    @task(4)
    def classify_one_multipart(self):
        image = random.choice(IMAGES)
        self._post("classify:multipart", _check_predictions(1, 5),
                   files=[("images", (image.name, image.data, image.content_type))])

    @task(2)
    def classify_one_json(self):
        image = random.choice(IMAGES)
        self._post("classify:json", _check_predictions(1, 3),
                   json={"images_base64": [base64.b64encode(image.data).decode()], "top_k": 3})

    @task(1)
    def classify_several(self):
        chosen = random.sample(IMAGES, random.randint(2, 4))
        self._post("classify:multi", _check_predictions(len(chosen), 5),
                   files=[("images", (i.name, i.data, i.content_type)) for i in chosen])


class FeatureMapInspector(_Checked):
    """People looking inside the network: feature maps in each format."""

    weight = WEIGHTS["inspector"]

    def _maps(self, fmt: str, extra: dict):
        image = random.choice(IMAGES)

        def check(body: dict) -> str | None:
            if body["format"] != fmt or not body["layers"]:
                return "wrong format or no layers"
            for layer in body["layers"]:
                if layer[fmt] in (None, [], ""):
                    return f"layer {layer['layer']} has no {fmt}"
            return None

        self._post(f"feature_maps:{fmt}", check, json={
            "image_base64": base64.b64encode(image.data).decode(), "format": fmt, **extra,
        })

    @task(2)
    def png(self):
        self._maps("png", {"top_channels": 16})

    @task(1)
    def array(self):
        self._maps("array", {"layers": ["conv1", "conv5"], "top_channels": 8})

    @task(1)
    def stats(self):
        self._maps("stats", {"stage": "pre_relu"})

    @task(1)
    def gradcam(self):
        image = random.choice(IMAGES)

        def check(body: dict) -> str | None:
            side = body["input_size"]
            if not 0 <= body["probability"] <= 1 or len(body["layer_map"]["shape"]) != 2:
                return f"bad Grad-CAM body: {str(body)[:200]}"
            png = base64.b64decode(body["heatmap_png"])
            # PNG header: width and height as big-endian 32-bit at bytes 16..24
            if png[:8] != b"\x89PNG\r\n\x1a\n" or png[16:24] != side.to_bytes(4, "big") * 2:
                return "heat map is not a PNG of the input size"
            return None

        self._post("gradcam", check, files=[("image", (image.name, image.data, image.content_type))])


class _Explaining:
    @staticmethod
    def check(body: dict) -> str | None:
        side = body["input_size"]
        if body["attribution"]["shape"] != [side, side] or not 0 <= body["probability"] <= 1:
            return f"bad /explain body: {str(body)[:200]}"
        return None


class AttributionClient(_Checked):
    """People asking where the evidence lies: a cheap method and a costly one, and the channel atlas."""

    weight = WEIGHTS.get("attribution", 1)

    @task(2)
    def guided_backprop(self):
        image = random.choice(SHAPES)
        self._post("explain:guided_backprop", _Explaining.check,
                   json={"image_base64": base64.b64encode(image.data).decode(), "method": "guided_backprop"})

    @task(1)
    def occlusion(self):
        image = random.choice(SHAPES)
        self._post("explain:occlusion", _Explaining.check,
                   json={"image_base64": base64.b64encode(image.data).decode(), "method": "occlusion"})


class EmbeddingClient(_Checked):
    weight = WEIGHTS["embedding"]

    @task
    def embed(self):
        chosen = random.sample(IMAGES, 2)

        def check(body: dict) -> str | None:
            vectors = body["embeddings"]
            if len(vectors) != 2 or any(len(v) != body["dim"] for v in vectors):
                return "wrong embedding shape"
            norm = sum(x * x for x in vectors[0]) ** 0.5
            return None if abs(norm - 1) < 1e-3 else f"not normalized (norm {norm})"

        self._post("embed", check, files=[("images", (i.name, i.data, i.content_type)) for i in chosen])
