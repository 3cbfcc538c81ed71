"""The real service over HTTP: every endpoint, every input form, refusals, batching, metrics."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.precision import resolve as resolve_precision
from model.preprocess import load_image
from service.core.settings import ServiceConfig
from testkit.images import b64, encode, png_header_only, shape_image, shape_png
from testkit.metrics import metric_samples, metric_sum
from testkit.server import serve_until_exit

pytestmark = pytest.mark.slow


# ----- classification ------------------------------------------------------------


def test_classify_json_base64_returns_top_k_sorted(server, tiny_run):
    classes = load_checkpoint(tiny_run).manifest.class_names
    response = httpx.post(f"{server.url}/classify", json={"images_base64": [b64(shape_png(5))], "top_k": 3}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"].startswith("cnn-classifier:")
    (prediction,) = body["predictions"]
    scores = prediction["top_k"]
    assert len(scores) == 3
    assert [s["probability"] for s in scores] == sorted((s["probability"] for s in scores), reverse=True)
    assert all(classes[s["index"]] == s["label"] for s in scores)


def test_classify_matches_in_process_model(server, tiny_run, served_precision):
    """The service's answer is the checkpoint's own prediction through the shared preprocessing,
    computed here in the precision the server computes in."""
    checkpoint = load_checkpoint(tiny_run)
    data = encode(shape_image(7, size=90), "JPEG", quality=90)
    expected = served_precision.predictor(checkpoint).predict(
        load_image(data, checkpoint.manifest.preprocessing).unsqueeze(0)
    ).probabilities[0]
    body = httpx.post(f"{server.url}/classify", json={"images_base64": [b64(data)], "top_k": 12}, timeout=30).json()
    served = {s["index"]: s["probability"] for s in body["predictions"][0]["top_k"]}
    for index, probability in served.items():
        assert probability == pytest.approx(expected[index].item(), abs=served_precision.probability_tolerance)


def test_classify_multipart_many_images_default_top_5(server):
    files = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(3)]
    response = httpx.post(f"{server.url}/classify", files=files, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3 and all(len(p["top_k"]) == 5 for p in predictions)


def test_classify_multipart_with_form_top_k(server):
    response = httpx.post(f"{server.url}/classify", files=[("images", ("a.jpg", encode(shape_image(1), "JPEG"), "image/jpeg"))],
                          data={"top_k": "2"}, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["top_k"]) == 2


# ----- embeddings ---------------------------------------------------------------


def test_embed_returns_fc7_vectors_normalized_or_not(server):
    images = [b64(shape_png(i)) for i in (0, 1)]
    unit = httpx.post(f"{server.url}/embed", json={"images_base64": images}, timeout=30).json()
    raw = httpx.post(f"{server.url}/embed", json={"images_base64": images, "normalize": False}, timeout=30).json()
    assert unit["layer"] == "fc7" and unit["dim"] == 256 and unit["normalized"] is True
    vectors = torch.tensor(unit["embeddings"])
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    raw_vectors = torch.tensor(raw["embeddings"])
    assert (raw_vectors >= 0).all()  # post-ReLU
    torch.testing.assert_close(torch.nn.functional.normalize(raw_vectors, dim=1), vectors, atol=1e-5, rtol=0)


# ----- feature maps ---------------------------------------------------------------


def test_feature_maps_png_grid_per_conv_layer_by_default(server):
    response = httpx.post(f"{server.url}/feature_maps", json={"image_base64": b64(shape_png(8))}, timeout=30)
    assert response.status_code == 200, response.text
    layers = response.json()["layers"]
    assert [layer["layer"] for layer in layers] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    conv1 = layers[0]
    assert conv1["shape"] == [32, 32, 32] and conv1["receptive_field"] == 5 and conv1["jump"] == 2
    grid = Image.open(io.BytesIO(base64.b64decode(conv1["png"])))
    assert grid.format == "PNG" and grid.width >= 6 * 32  # 32 tiles: a 6x6 grid of 32-px tiles


def test_feature_maps_array_is_exact_float16(server, tiny_run, served_precision):
    """The float16 payload holds the serving copy's activations (computed here in the server's
    precision) to float16's rounding (bf16 values convert to float16 exactly)."""
    data = shape_png(3)
    body = httpx.post(f"{server.url}/feature_maps", json={
        "image_base64": b64(data), "layers": ["conv2", "fc7"], "channels": [0, 5], "format": "array",
        "stage": "pre_relu",
    }, timeout=30).json()
    checkpoint = load_checkpoint(tiny_run)
    local = served_precision.predictor(checkpoint).activations(
        load_image(data, checkpoint.manifest.preprocessing), ["conv2", "fc7"], "pre_relu")
    for layer in body["layers"]:
        array = layer["array"]
        values = np.frombuffer(base64.b64decode(array["data"]), dtype="<f2").reshape(array["shape"])
        expected = local[layer["layer"]][[0, 5]].numpy().astype(np.float16).astype(np.float32)
        # float16's rounding; in bf16 also one bf16 step (2^-7) where the two computations round apart
        step = 1e-3 if served_precision.name == "fp32" else 2 ** -7
        np.testing.assert_allclose(values.astype(np.float32), expected, rtol=step, atol=step * max(1, np.abs(expected).max()))
    assert (np.frombuffer(base64.b64decode(body["layers"][0]["array"]["data"]), dtype="<f2") < 0).any()


def test_feature_maps_stats_and_top_channels(server):
    body = httpx.post(f"{server.url}/feature_maps", json={
        "image_base64": b64(shape_png(11)), "layers": ["conv3"], "top_channels": 4, "format": "stats",
    }, timeout=30).json()
    stats = body["layers"][0]["stats"]
    means = [s["mean"] for s in stats]
    assert len(stats) == 4 and means == sorted(means, reverse=True)
    assert all(0 <= s["zero_fraction"] <= 1 and s["max"] >= s["mean"] >= 0 for s in stats)


@pytest.mark.parametrize("payload, status, reason", [
    ({"layers": ["conv9"]}, 422, "unknown_layer"),
    ({"layers": ["conv1"], "channels": [32]}, 422, "channel_out_of_range"),
    ({"channels": [0], "top_channels": 2}, 400, "ambiguous_channels"),
    ({"stage": "sideways"}, 400, None),
    ({"format": "gif"}, 400, None),
])
def test_feature_maps_refusals(server, payload, status, reason):
    response = httpx.post(f"{server.url}/feature_maps", json={"image_base64": b64(shape_png(0)), **payload}, timeout=30)
    assert response.status_code == status, response.text
    if reason:
        assert response.json()["error"] == reason
    if reason == "unknown_layer":
        assert "conv1" in response.json()["detail"]


# ----- Grad-CAM --------------------------------------------------------------------------


def test_gradcam_explains_the_top_class_with_a_heat_map(server, tiny_run, served_precision):
    data = shape_png(5)
    classified = httpx.post(f"{server.url}/classify", json={"images_base64": [b64(data)], "top_k": 1},
                            timeout=30).json()["predictions"][0]["top_k"][0]
    response = httpx.post(f"{server.url}/gradcam", files=[("image", ("circle.png", data, "image/png"))], timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["layer"], body["class_index"], body["label"]) == ("conv5", classified["index"], classified["label"])
    # the served answer: the same probability as /classify's, whatever the precision (README: /gradcam)
    assert body["probability"] == pytest.approx(classified["probability"], abs=served_precision.probability_tolerance)
    assert body["layer_map"]["shape"] == [8, 8] and body["receptive_field"] > 8
    values = np.frombuffer(base64.b64decode(body["layer_map"]["data"]), dtype="<f2")
    assert values.min() >= 0 and values.max() == pytest.approx(1, abs=1e-3)
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.mode == "RGBA" and heat.size == (64, 64)


def test_gradcam_of_a_chosen_class_and_layer(server):
    body = httpx.post(f"{server.url}/gradcam", json={"image_base64": b64(shape_png(2)), "layer": "conv2",
                                                      "class_index": 7}, timeout=30).json()
    assert body["layer"] == "conv2" and body["class_index"] == 7 and body["layer_map"]["shape"] == [16, 16]


def test_one_answer_per_image_across_endpoints_in_each_precision(server_in_each_precision):
    """/classify, /gradcam and /explain report the served model's answer for an image: the same class
    and probability, in fp32 and in bf16 (the maps come from the fp32 reference, the answer does not)."""
    server, precision = server_in_each_precision
    tolerance = precision.probability_tolerance
    images = [shape_png(5), encode(shape_image(7, size=90), "JPEG", quality=90), shape_png(10)]
    for data in images:
        classified = httpx.post(f"{server.url}/classify", json={"images_base64": [b64(data)], "top_k": 12},
                                timeout=60).json()["predictions"][0]["top_k"]
        top, second = classified[0], classified[1]
        cam = httpx.post(f"{server.url}/gradcam", json={"image_base64": b64(data)}, timeout=60).json()
        assert cam["class_index"] == top["index"]
        assert cam["probability"] == pytest.approx(top["probability"], abs=tolerance)
        for method in ("gradcam", "guided_backprop", "occlusion"):
            explained = httpx.post(f"{server.url}/explain", json={"image_base64": b64(data), "method": method},
                                   timeout=60).json()
            assert explained["class_index"] == top["index"], (method, explained)
            assert explained["probability"] == pytest.approx(top["probability"], abs=tolerance), method
        chosen = httpx.post(f"{server.url}/explain", json={"image_base64": b64(data), "method": "gradcam",
                                                           "class_index": second["index"]}, timeout=60).json()
        assert chosen["class_index"] == second["index"]
        assert chosen["probability"] == pytest.approx(second["probability"], abs=tolerance)


@pytest.mark.parametrize("payload, status, reason", [
    ({"layer": "fc6"}, 422, "unknown_layer"),
    ({"class_index": 12}, 422, "class_out_of_range"),
    ({"class_index": -1}, 400, None),
])
def test_gradcam_refusals(server, payload, status, reason):
    response = httpx.post(f"{server.url}/gradcam", json={"image_base64": b64(shape_png(0)), **payload}, timeout=30)
    assert response.status_code == status, response.text
    if reason:
        assert response.json()["error"] == reason


# ----- introspection --------------------------------------------------------------------


def test_model_endpoint_describes_manifest_and_layers(server, tiny_run):
    """/model names the precision the configuration (PRECISION, auto by default) resolves to here."""
    body = httpx.get(f"{server.url}/model", timeout=30).json()
    manifest = load_checkpoint(tiny_run).manifest
    assert body["weights_sha256"] == manifest.weights_sha256
    assert body["classes"] == manifest.class_names and body["preset"] == "small"
    served = resolve_precision(ServiceConfig.from_env().precision, torch.device("cpu"),
                               manifest.training.get("precision_agreement"))
    assert body["device"] == "cpu" and body["precision"]["name"] == served.name
    assert body["dtype"] == str(served.dtype).removeprefix("torch.") and body["precision"]["reason"]
    assert body["training"]["metrics"]["test_top1"] == manifest.training["metrics"]["test_top1"]
    layers = {row["name"]: row for row in body["layers"]}
    assert layers["conv1"]["output_shape"] == [32, 32, 32] and layers["fc8"]["output_values"] == 12


def test_kernels_png(server):
    response = httpx.get(f"{server.url}/kernels", params={"layer": "conv1"}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGB" and image.width > 100  # 32 colour kernels, enlarged
    bad = httpx.get(f"{server.url}/kernels", params={"layer": "fc6"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"] == "unknown_layer"


def test_openapi_documents_the_endpoints(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    for path in ("/classify", "/embed", "/feature_maps"):
        assert {"200", "400", "413", "422", "503"} <= set(spec["paths"][path]["post"]["responses"])
    assert "images_base64" in json.dumps(spec["paths"]["/classify"])
    assert "get" in spec["paths"]["/model"] and "get" in spec["paths"]["/kernels"]


# ----- refusals: 4xx JSON with a reason, and the worker lives on ----------------------------


def _bad_requests():
    big = b"\0" * (3 * 1024 * 1024 + 10)
    return [
        ("empty image", {"json": {"images_base64": [""]}}, 422, "empty"),
        ("not an image", {"json": {"images_base64": [b64(b"definitely not pixels")]}}, 422, "not_an_image"),
        ("truncated PNG", {"json": {"images_base64": [b64(shape_png(1)[:300])]}}, 422, "corrupt"),
        ("pixel bomb", {"json": {"images_base64": [b64(png_header_only(30000, 30000))]}}, 422, "too_many_pixels"),
        ("invalid base64", {"json": {"images_base64": ["***"]}}, 400, "invalid_base64"),
        ("no image", {"json": {}}, 400, "no_image"),
        ("both forms", {"files": [("images", ("a.png", shape_png(0)))], "data": {"images_base64": json.dumps([b64(shape_png(0))])}}, 400, "ambiguous_input"),
        ("too many images", {"json": {"images_base64": [b64(shape_png(0))] * 17}}, 413, "too_many_images"),
        ("body too large", {"content": big, "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
        ("url in file field", {"files": [("images", (None, "http://example.com/cat.jpg"))]}, 400, "file_field_not_a_file"),
        ("top_k zero", {"json": {"images_base64": [b64(shape_png(0))], "top_k": 0}}, 400, None),
        ("invalid JSON", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, None),
    ]


@pytest.mark.parametrize("name, request_kwargs, status, reason", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_bad_input_gets_4xx_json(server, name, request_kwargs, status, reason):
    response = httpx.post(f"{server.url}/classify", timeout=30, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert "error" in body
    if reason:
        assert body["error"] == reason


def test_worker_survives_bad_input_and_refusals_are_counted(server):
    pids = server.worker_pids()
    before = metric_samples(server.url)
    for _ in range(3):
        httpx.post(f"{server.url}/classify", json={"images_base64": [b64(b"junk")]}, timeout=30)
    after = metric_samples(server.url)
    assert metric_sum(after, "cnn_refusals_total", endpoint="classify", reason="not_an_image") - \
        metric_sum(before, "cnn_refusals_total", endpoint="classify", reason="not_an_image") == 3
    assert server.worker_pids() == pids
    assert httpx.post(f"{server.url}/classify", json={"images_base64": [b64(shape_png(2))]}, timeout=30).status_code == 200


# ----- batching and metrics --------------------------------------------------------------


def test_concurrent_requests_are_batched(server):
    before = metric_samples(server.url)
    payload = {"images_base64": [b64(shape_png(3))], "top_k": 1}
    with ThreadPoolExecutor(max_workers=24) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/classify", json=payload, timeout=60).status_code,
                                 range(96)))
    admission = [httpx.get(f"{server.url}/model", timeout=30).json()["batching"]["admission"] for _ in range(4)]
    assert statuses == [200] * 96, f"refused: {statuses.count(503)}; the workers' admission: {admission}"
    after = metric_samples(server.url)
    batches = metric_sum(after, "cnn_batch_size_count") - metric_sum(before, "cnn_batch_size_count")
    images = metric_sum(after, "cnn_batch_size_sum") - metric_sum(before, "cnn_batch_size_sum")
    singles = metric_sum(after, "cnn_batch_size_bucket", le="1.0") - metric_sum(before, "cnn_batch_size_bucket", le="1.0")
    assert images == 96
    assert batches < 96 and singles < batches, "some forward passes must have carried more than one image"


def test_client_connections_spread_evenly_over_the_api_workers(server):
    """service.http.guards.SpreadConnections in the real server: keep-alive clients that reconnect when told
    (`Connection: close`) end up spread evenly over the API workers, and then nobody is told again."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    import psutil

    address = urlsplit(server.url)
    workers = server.worker_pids()
    if len(workers) < 2:
        pytest.skip("one API worker: nothing to spread")

    def per_worker() -> list[int]:  # this test's connections, as each worker holds them
        ours = {sock.getsockname()[1] for sock in sockets}
        return [sum(1 for c in psutil.Process(pid).net_connections("tcp")
                    if c.laddr.port == address.port and c.raddr and c.raddr.port in ours) for pid in workers]

    def ask(sock) -> str | None:
        sock.sendall(f"GET /livez HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        assert response.status == 200
        return response.getheader("connection")

    from service.control.control_dir import ControlDir
    from service.http.connection_board import ConnectionBoard
    from testkit.wait import wait_until

    # the earlier tests' connections no longer counted as active (they expire after WINDOW_S)
    board = ConnectionBoard(ControlDir(ControlDir.for_server(server.process.pid)).path / "connections",
                            len(workers), slot=0)
    wait_until(lambda: board.active() == 0, 60, "earlier connections expired from the board")
    clients = 4 * len(workers)
    sockets = [socket.create_connection((address.hostname, address.port), timeout=30) for _ in range(clients)]
    try:
        for _ in range(200):  # a hang guard: each round moves a connection with even odds or better
            told = False
            for index, sock in enumerate(sockets):
                if ask(sock) == "close":
                    told = True
                    sock.close()
                    sockets[index] = socket.create_connection((address.hostname, address.port), timeout=30)
            # Counted only after a round in which nobody was told: then every connection is one that has
            # been answered, none is closing or waiting to be accepted, and the workers' counts are exact.
            if not told and per_worker() == [4] * len(workers):
                break
        assert per_worker() == [4] * len(workers)
        assert [ask(sock) for _ in range(3) for sock in sockets] == [None] * 3 * clients  # even: nobody is told
    finally:
        for sock in sockets:
            sock.close()


def test_metrics_move_by_expected_amounts(server, tiny_run):
    before = metric_samples(server.url)
    files = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(3)]
    assert httpx.post(f"{server.url}/classify", files=files, timeout=30).status_code == 200
    assert httpx.post(f"{server.url}/feature_maps", json={"image_base64": b64(shape_png(0)), "layers": ["conv1"]},
                      timeout=30).status_code == 200
    after = metric_samples(server.url)

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("cnn_images_processed_total", endpoint="classify") == 3
    assert delta("cnn_predictions_total") == 3
    assert delta("cnn_top1_confidence_count") == 3
    assert delta("cnn_preprocess_seconds_count", endpoint="classify") == 3
    assert delta("cnn_model_forward_seconds_count", endpoint="feature_maps") == 1
    assert delta("cnn_feature_map_response_bytes_total", format="png") > 100
    recorded = load_checkpoint(tiny_run).manifest.training.get("precision_agreement")
    dtype = str(resolve_precision(ServiceConfig.from_env().precision, torch.device("cpu"), recorded).dtype)
    dtype = dtype.removeprefix("torch.")
    assert metric_sum(after, "cnn_model_info", device="cpu", dtype=dtype) == 1


def test_metrics_pass_promtool(server):
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system-deps installs Debian's prometheus)")
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----- auth and start-up ---------------------------------------------------------------------


def test_api_key_guards_inference_but_not_health(secured_server):
    url = secured_server.url
    payload = {"images_base64": [b64(shape_png(0))]}
    assert httpx.post(f"{url}/classify", json=payload, timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/classify", json=payload, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    ok = httpx.post(f"{url}/classify", json=payload, headers={"Authorization": "Bearer s3cret-key"}, timeout=30)
    assert ok.status_code == 200
    assert httpx.get(f"{url}/model", timeout=30).status_code == 401
    for open_path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{url}{open_path}", timeout=30).status_code == 200


def test_auth_off_by_default(server):
    assert httpx.get(f"{server.url}/model", timeout=30).status_code == 200


def test_corrupt_checkpoint_stops_startup(cli_env, tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    weights = broken / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0x55
    weights.write_bytes(bytes(blob))
    result = serve_until_exit({**cli_env, "CHECKPOINT_DIR": str(broken)})
    assert result.returncode != 0
    assert "sha256" in result.stdout + result.stderr and "weights.safetensors" in result.stdout + result.stderr


def test_missing_model_stops_startup(cli_env, tmp_path):
    result = serve_until_exit({**cli_env, "BENTOML_HOME": str(tmp_path / "empty_store")})
    assert result.returncode != 0
    assert "not in the BentoML model store" in result.stdout + result.stderr


def test_an_unsure_answer_is_marked_low_confidence_and_the_field_is_documented(server):
    """`low_confidence`: the top probability under LOW_CONFIDENCE_BELOW (0.5), in the answer and the spec."""
    schemas = httpx.get(f"{server.url}/docs.json", timeout=30).json()["components"]["schemas"]
    (field,) = [s["properties"]["low_confidence"] for s in schemas.values()
                if "low_confidence" in s.get("properties", {})]
    assert field["type"] == "boolean" and "LOW_CONFIDENCE_BELOW" in field["description"]
    files = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(12)]
    files.append(("images", ("flat.png", encode(Image.fromarray(np.full((64, 64, 3), 128, np.uint8))), "image/png")))
    predictions = httpx.post(f"{server.url}/classify", files=files, timeout=60).json()["predictions"]
    assert [p["low_confidence"] for p in predictions] == [p["top_k"][0]["probability"] < 0.5 for p in predictions]
