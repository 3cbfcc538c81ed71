"""The Open Inference Protocol (service.oip.app) the way its users call it: tritonclient (binary tensor
data and JSON) and KServe's REST client against a real `bentoml serve`, every route, feature maps
and errors; its answers equal /classify's and /feature_maps'. Plus the wire format and the guards
on their own, in process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from model.client_preprocess import client_pixels
from testkit.metrics import metric_samples, metric_sum
from testkit.docs import code_block
from testkit.server import API_KEY, ROOT, start_server

KSERVE_PYTHON = ROOT / ".venv" / "peers" / "kserve" / "bin" / "python"
PREDICTED = ("probabilities", "top_k_labels", "top_k_scores", "top_k_indices", "embedding")


@pytest.fixture(scope="module")
def model(registered_model) -> tuple[str, str]:
    """(name, version) the protocol serves: the store tag's."""
    name, version = registered_model.split(":")
    return name, version


def _triton(url: str):
    import tritonclient.http as triton

    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


def _bytes_input(triton, encoded: list[bytes], binary: bool):
    tensor = triton.InferInput("images", [len(encoded)], "BYTES")
    values = encoded if binary else [base64.b64encode(e) for e in encoded]  # JSON: BYTES in base64
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def _pixels_input(triton, pixels: np.ndarray, binary: bool = True, datatype: str = "UINT8"):
    tensor = triton.InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def _classify_probabilities(url: str, paths: list[Path], classes: int) -> np.ndarray:
    """/classify's probabilities for the images, as [N, classes]."""
    files = [("images", (p.name, p.read_bytes())) for p in paths]
    answer = httpx.post(f"{url}/classify", files=files, data={"top_k": str(classes)}, timeout=60).json()
    found = np.zeros((len(paths), classes))
    for row, prediction in zip(found, answer["predictions"]):
        for score in prediction["top_k"]:
            row[score["index"]] = score["probability"]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_calls_every_route_and_matches_classify(server, model, images, served_precision, binary):
    import tritonclient.http as triton

    name, version = model
    client = _triton(server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, version)
    assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata()["extensions"])
    described = client.get_model_metadata(name, version)
    assert described == client.get_model_metadata(name) and described["versions"] == [version]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in described["inputs"]} == {
        "images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 64, 64, 3])}
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in described["outputs"]}
    classes = shapes["probabilities"][1][1]
    assert shapes["conv1"] == ("FP32", [-1, 32, 32, 32]) and shapes["fc7"] == ("FP32", [-1, 256])

    paths = [images["cat.jpg"], images["dog.png"]]
    encoded = [p.read_bytes() for p in paths]
    asked = [triton.InferRequestedOutput(n, binary_data=binary) for n in (*PREDICTED, "conv1", "fc7")]
    answer = client.infer(name, [_bytes_input(triton, encoded, binary)], model_version=version, outputs=asked,
                          parameters={"top_k": 3, "conv1.channels": "0,2"}, request_id="r-1")
    assert answer.get_response()["id"] == "r-1" and answer.get_response()["model_version"] == version
    probabilities = answer.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, classes)
    # the same numbers /classify answers, within the serving precision's tolerance
    expected = _classify_probabilities(server.url, paths, classes)
    assert np.abs(probabilities - expected).max() <= served_precision.probability_tolerance
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    assert (answer.as_numpy("top_k_indices") == order).all()
    assert np.allclose(answer.as_numpy("top_k_scores"), np.take_along_axis(probabilities, order, axis=1))
    labels = [[label.decode() if isinstance(label, bytes) else label for label in row]
              for row in answer.as_numpy("top_k_labels")]
    assert labels == [[described["parameters"]["classes"][i] for i in row] for row in order.tolist()]
    embedding = answer.as_numpy("embedding")
    assert embedding.shape == (2, 256) and np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-3)
    assert answer.as_numpy("conv1").shape == (2, 2, 32, 32) and answer.as_numpy("fc7").shape == (2, 256)

    # feature maps equal /feature_maps' exact (float16) values for the same image and channels
    maps = httpx.post(f"{server.url}/feature_maps", timeout=60, data={"layers": '["conv1"]', "channels": "[0, 2]",
                      "format": "array"}, files=[("image", ("cat.jpg", encoded[0]))]).json()
    exact = np.frombuffer(base64.b64decode(maps["layers"][0]["array"]["data"]), dtype="<f2").reshape(2, 32, 32)
    assert np.allclose(answer.as_numpy("conv1")[0], exact.astype(np.float32), rtol=1e-3, atol=1e-3)

    # the same images as pixels, cropped by the client: the same answer, without decoding on the server
    prep = described["parameters"]
    pixels = client_pixels(paths, prep["resize_size"], prep["input_size"])
    by_pixels = client.infer(name, [_pixels_input(triton, pixels, binary)],
                             outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
    assert np.abs(by_pixels.as_numpy("probabilities") - probabilities).max() <= served_precision.probability_tolerance

    # Triton's classification extension, and every output when none is named
    top = client.infer(name, [_pixels_input(triton, pixels, binary)],
                       outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)])
    first = top.as_numpy("probabilities")[0][0]
    score, index, label = (first.decode() if isinstance(first, bytes) else first).split(":")
    assert int(index) == order[0][0] and label == labels[0][0]
    assert abs(float(score) - probabilities[0, order[0][0]]) < 1e-5
    everything = client.infer(name, [_pixels_input(triton, pixels, binary)])
    assert {o["name"] for o in everything.get_response()["outputs"]} == set(PREDICTED)


@pytest.mark.slow
def test_tritonclient_errors_name_the_reason_with_a_4xx(server, model, images):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name, _ = model
    client = _triton(server.url)
    pixels = client_pixels([images["cat.jpg"]], 64, 64)

    def refused(*args, **kwargs) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as err:
            client.infer(*args, **kwargs)
        return err.value.status(), err.value.message()

    cases = {
        "channels first": ((name, [_pixels_input(triton, pixels.transpose(0, 3, 1, 2).copy())]), "400",
                           "shape_mismatch"),
        "float pixels": ((name, [_pixels_input(triton, pixels.astype(np.float32), datatype="FP32")]), "400",
                         "datatype_mismatch"),
        "unknown output": ((name, [_pixels_input(triton, pixels)]), "400", "unknown_output",
                           {"outputs": [triton.InferRequestedOutput("conv9")]}),
        "channel out of range": ((name, [_pixels_input(triton, pixels)]), "422", "channel_out_of_range",
                                 {"outputs": [triton.InferRequestedOutput("conv1")],
                                  "parameters": {"conv1.channels": "0,999"}}),
        "not an image": ((name, [_bytes_input(triton, [b"GIF89a but not really"], True)]), "422", "corrupt"),
        "text as image": ((name, [_bytes_input(triton, [b"hello"], True)]), "422", "not_an_image"),
        "too many images": ((name, [_bytes_input(triton, [images["cat.jpg"].read_bytes()] * 17, True)]), "413",
                            "too_many_images"),
        "unknown model": (("no-such-model", [_pixels_input(triton, pixels)]), "404", "unknown_model"),
        "unknown version": ((name, [_pixels_input(triton, pixels)]), "404", "unknown_version",
                            {"model_version": "v0"}),
        "bad top_k": ((name, [_pixels_input(triton, pixels)]), "400", "invalid_parameter",
                      {"parameters": {"top_k": 0}}),
    }
    for case, (args, status, reason, *kwargs) in cases.items():
        got_status, message = refused(*args, **(kwargs[0] if kwargs else {}))
        assert (got_status, message.split(":")[0]) == (status, reason), (case, got_status, message)
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "404"
    assert not client.is_model_ready(name, "v0")


@pytest.mark.slow
def test_malformed_bodies_get_the_protocols_error_body_never_a_5xx(server, model):
    name, _ = model
    infer = f"{server.url}/v2/models/{name}/infer"
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 64, 64, 3],
                                     "parameters": {"binary_data_size": 64 * 64 * 3}}]}).encode()
    cases = {
        "not json": (b"{nope", {}, 400, "invalid_json"),
        "json nested past the parser's depth": (b"[" * 100_000, {}, 400, "invalid_json"),
        "binary shorter than declared": (header + b"\0" * 100, {"Inference-Header-Content-Length": str(len(header))},
                                         400, "size_mismatch"),
        "binary longer than declared": (header + b"\0" * (64 * 64 * 3 + 1),
                                        {"Inference-Header-Content-Length": str(len(header))}, 400, "size_mismatch"),
        "header length past the body": (header, {"Inference-Header-Content-Length": "999999"}, 400,
                                        "invalid_header_length"),
        "json data of the wrong size": (json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                                "shape": [1, 64, 64, 3], "data": [1, 2, 3]}]}).encode(),
                                        {}, 400, "size_mismatch"),
        "two inputs": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                               "data": ["AA=="]}] * 2}).encode(), {}, 400, "one_input"),
        "body over MAX_BODY_BYTES": (b"x" * (3 * 1024 * 1024 + 1), {}, 413, "body_too_large"),
    }
    for case, (body, headers, status, reason) in cases.items():
        answer = httpx.post(infer, content=body, headers=headers, timeout=60)
        assert answer.status_code == status, (case, answer.text)
        assert list(answer.json()) == ["error"] and answer.json()["error"].startswith(f"{reason}: "), case
    missing = httpx.get(f"{server.url}/v2/models/{name}/nope", timeout=30)
    assert missing.status_code == 404 and list(missing.json()) == ["error"]


@pytest.mark.slow
def test_oip_requests_are_counted_in_the_services_metrics(server, model, images):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name, _ = model
    before = metric_samples(server.url)
    client = _triton(server.url)
    client.infer(name, [_bytes_input(triton, [images["cat.jpg"].read_bytes()] * 3, True)])
    with pytest.raises(InferenceServerException):
        client.infer(name, [_pixels_input(triton, np.zeros((1, 3, 64, 64), dtype=np.uint8))])
    after = metric_samples(server.url)

    def grew(metric: str, **labels) -> float:
        return metric_sum(after, metric, **labels) - metric_sum(before, metric, **labels)

    assert grew("cnn_images_processed_total", endpoint="v2_infer") == 3
    assert grew("cnn_refusals_total", endpoint="v2_infer", reason="shape_mismatch") == 1
    assert grew("cnn_preprocess_seconds_count", endpoint="v2_infer") == 3  # each image decoded once
    assert grew("cnn_top1_confidence_count") >= 3


@pytest.mark.slow
def test_at_capacity_infer_is_shed_with_503_and_retry_after(cli_env, registered_model, model, tmp_path_factory):
    """Admission control as for /classify: a 5 ms latency budget admits one 16-image request at a time."""
    import aiohttp

    name, _ = model
    server = start_server(cli_env, tmp_path_factory.mktemp("oip_shed"), MAX_LATENCY_MS="5", API_WORKERS="1")
    pixels = np.zeros((16, 64, 64, 3), dtype=np.uint8)
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()

    async def flood() -> list[tuple[int, str | None, dict]]:
        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(f"{server.url}/v2/models/{name}/infer", data=header + pixels.tobytes(),
                                        headers={"Inference-Header-Content-Length": str(len(header))}) as answer:
                    body = await answer.read()
                    return answer.status, answer.headers.get("Retry-After"), body

            return await asyncio.gather(*(one() for _ in range(48)))

    try:
        answers = asyncio.run(flood())
        refusals = metric_sum(metric_samples(server.url), "cnn_refusals_total", endpoint="v2_infer",
                              reason="overloaded")
        # How many of the flood got through depends on the machine's speed. Alone, a request is admitted
        # (an idle service takes any request); with a 5 ms budget a busy machine's event loop can still
        # make it wait past the budget in the batcher's queue, so it may take a few tries.
        for _ in range(5):
            alone = httpx.post(f"{server.url}/v2/models/{name}/infer", content=header + pixels.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))}, timeout=60)
            if alone.status_code == 200:
                break
    finally:
        server.stop()
    shed = [(retry, json.loads(body)) for status, retry, body in answers if status == 503]
    assert {status for status, _, _ in answers} <= {200, 503} and shed
    assert alone.status_code == 200, alone.text
    assert all(retry == "1" and list(body) == ["error"] and body["error"].startswith("overloaded: ")
               for retry, body in shed)
    assert refusals == len(shed)


@pytest.mark.slow
def test_the_api_key_guards_every_oip_route_but_health(secured_server, model):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name, _ = model
    client = _triton(secured_server.url)
    assert client.is_server_live() and client.is_server_ready()  # open, like /livez and /readyz
    key = {"Authorization": f"Bearer {API_KEY}"}
    pixels = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    for call in (lambda h: client.get_server_metadata(headers=h), lambda h: client.get_model_metadata(name, headers=h),
                 lambda h: client.infer(name, [_pixels_input(triton, pixels)], headers=h)):
        with pytest.raises(InferenceServerException) as err:
            call(None)
        assert err.value.status() == "401" and err.value.message().startswith("unauthorized: ")
        call(key)
    assert not client.is_model_ready(name) and client.is_model_ready(name, headers=key)


@pytest.mark.slow
def test_kserve_rest_client_calls_every_route(server, model, images):
    if not KSERVE_PYTHON.exists():
        built = subprocess.run(["make", "-s", "oip-clients"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            pytest.skip(f"KServe's client could not be installed (`make oip-clients`): {built.stderr[-500:]}")
    name, version = model
    run = subprocess.run([str(KSERVE_PYTHON), str(ROOT / "testkit" / "oip_kserve.py"), server.url, name, version,
                          str(images["cat.jpg"]), str(images["dog.png"])], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"] and not seen["unknown_model_ready"]
    assert "binary_tensor_data" in seen["server"]["extensions"] and seen["model"]["versions"] == [version]
    binary, as_json = seen["bytes_binary=True"], seen["bytes_binary=False"]
    assert binary == as_json  # the same tensors either way
    assert binary["probabilities"]["shape"] == [2, 12] and binary["top_k_labels"]["shape"] == [2, 2]
    assert binary["conv2"]["shape"] == [2, 3, 16, 16] and binary["embedding"]["datatype"] == "FP32"
    assert abs(np.linalg.norm(binary["embedding"]["data"][0]) - 1) > 1e-3  # normalize: false was honoured
    assert seen["pixels_shape"] == [1, 12]
    assert seen["errors"]["shape"]["status"] == 400 and seen["errors"]["model"]["status"] == 404
    assert seen["errors"]["shape"]["body"]["error"].startswith("shape_mismatch: ")


OIP_PATHS = {"/v2": "get", "/v2/health/live": "get", "/v2/health/ready": "get",
             "/v2/models/{model_name}": "get", "/v2/models/{model_name}/versions/{model_version}": "get",
             "/v2/models/{model_name}/ready": "get", "/v2/models/{model_name}/versions/{model_version}/ready": "get",
             "/v2/models/{model_name}/infer": "post", "/v2/models/{model_name}/versions/{model_version}/infer": "post"}


def _conforms(spec: dict, operation: dict, answer: httpx.Response) -> None:
    """The answer's status and content type are documented for the operation, and its (JSON) body fits
    the documented schema."""
    from jsonschema import Draft202012Validator

    documented = operation["responses"].get(str(answer.status_code))
    assert documented is not None, (answer.status_code, answer.text[:300])
    media = answer.headers["content-type"].split(";")[0]
    assert media in documented["content"], (answer.status_code, media)
    if media == "application/json":
        schema = {**documented["content"][media]["schema"], "components": spec["components"]}
        Draft202012Validator(schema).validate(answer.json())


@pytest.mark.slow
def test_docs_list_the_oip_routes_and_each_answers_as_documented(server, model, images):
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    name, version = model
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    validate(spec)
    assert {path: set(ops) for path, ops in spec["paths"].items() if path.startswith("/v2")} == {
        path: {method} for path, method in OIP_PATHS.items()}
    assert "Open Inference Protocol (KServe v2)" in {tag["name"] for tag in spec["tags"]}
    error = spec["components"]["schemas"]["OipError"]
    assert error["required"] == ["error"] and set(error["properties"]) == {"error"}  # not {"error", "detail"}
    cat = base64.b64encode(images["cat.jpg"].read_bytes()).decode()
    request = {"id": "r-9", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [cat]}],
               "outputs": [{"name": "top_k_labels", "parameters": {"top_k": 2}}, {"name": "conv1"}]}
    for path, method in OIP_PATHS.items():
        operation = spec["paths"][path][method]
        assert operation["tags"] == ["Open Inference Protocol (KServe v2)"]
        params = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
        assert set(params) == set(re.findall(r"{(\w+)}", path)), path
        # the path parameters' examples are the served model's: the examples call it
        served = {"model_name": name, "model_version": version}
        assert {k: p["example"] for k, p in params.items()} == {k: served[k] for k in params}, path
        url = server.url + path.format(model_name=name, model_version=version)
        if method == "get":
            answer = httpx.get(url, timeout=60)
            assert answer.status_code == 200, (path, answer.text)
            _conforms(spec, operation, answer)
        else:
            content = operation["requestBody"]["content"]
            assert set(content) == {"application/json", "application/octet-stream"}
            assert any(p["in"] == "header" and p["name"] == "Inference-Header-Content-Length"
                       for p in operation["parameters"])
            for body in (request, content["application/json"]["example"]):  # ours, and the spec's example
                answer = httpx.post(url, json=body, timeout=60)
                assert answer.status_code == 200, (path, answer.text)
                _conforms(spec, operation, answer)
            assert answer.json()["id"] == "42"
            # binary tensor data both ways: octet-stream in, octet-stream out
            described = httpx.get(f"{server.url}/v2/models/{name}", timeout=30).json()["parameters"]
            pixels = np.zeros((1, described["input_size"], described["input_size"], 3), dtype=np.uint8)
            header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                             "parameters": {"binary_data_size": pixels.nbytes}}],
                                 "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
            answer = httpx.post(url, content=header + pixels.tobytes(), timeout=60, headers={
                "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
            assert answer.status_code == 200, answer.text
            assert "Inference-Header-Content-Length" in operation["responses"]["200"]["headers"]
            _conforms(spec, operation, answer)  # documented as application/octet-stream
            length = int(answer.headers["inference-header-content-length"])
            head = json.loads(answer.content[:length])  # its JSON part: the documented response object
            json_200 = operation["responses"]["200"]["content"]["application/json"]
            Draft202012Validator({**json_200["schema"], "components": spec["components"]}).validate(head)
            assert len(answer.content) - length == head["outputs"][0]["parameters"]["binary_data_size"]
            refused = httpx.post(url, content=b"{nope", timeout=60, headers={"Content-Type": "application/json"})
            assert refused.status_code == 400
            _conforms(spec, operation, refused)
        if "model_name" in params:  # another model: the documented 404, with the protocol's error body
            missing = (httpx.get if method == "get" else httpx.post)(
                server.url + path.format(model_name="no-such-model", model_version=version), timeout=30,
                **({} if method == "get" else {"json": request}))
            assert missing.status_code == 404 and list(missing.json()) == ["error"], (path, missing.text)
            _conforms(spec, operation, missing)


# ----- in process: the wire format, the client's preprocessing, the guards ----------------------------


def test_binary_request_splits_into_its_tensors():
    from service.oip.codec import parse_request

    header = json.dumps({"id": "7", "inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 4 + 3 + 4 + 1}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    body = header + struct.pack("<I", 3) + b"abc" + struct.pack("<I", 1) + b"d"
    request = parse_request(body, str(len(header)))
    assert request.id == "7" and request.outputs[0].parameters == {"binary_data": True}
    assert request.inputs[0].bytes_elements() == [b"abc", b"d"]


def test_binary_response_puts_tensors_after_the_json_in_order():
    from service.oip.codec import OutputTensor, encode_response

    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    body, length = encode_response({"model_name": "m"}, [
        OutputTensor("scores", "FP32", scores, [1, 2], True),
        OutputTensor("labels", "BYTES", [["a", "bc"]], [1, 2], True),
        OutputTensor("top", "INT64", np.array([[1, 0]]), [1, 2], False)])
    header = json.loads(body[:length])
    assert [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]] == [8, 4 + 1 + 4 + 2, None]
    assert header["outputs"][2]["data"] == [1, 0]
    assert np.frombuffer(body[length:length + 8], dtype="<f4").tolist() == [0.25, 0.75]
    assert body[length + 8:] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"


def test_client_pixels_equal_the_servers_decoding(images):
    from model.config import Preprocessing
    from model.preprocess import load_pixels

    prep = Preprocessing(input_size=64, resize_size=72)
    paths = [images["cat.jpg"], images["dog.png"]]
    made = client_pixels(paths, prep.resize_size, prep.input_size)
    assert made.shape == (2, 64, 64, 3) and made.dtype == np.uint8
    assert (made == np.stack([load_pixels(p.read_bytes(), prep) for p in paths])).all()
    from PIL import Image

    as_array = np.asarray(Image.open(images["dog.png"]).convert("RGB"))
    assert (client_pixels([as_array], 72, 64) == made[1:]).all()  # decoded by the client (PNG: lossless)


def test_oip_infer_is_declared_sheddable_and_its_refusals_keep_the_protocols_body():
    """Admission's door and the API key in front of /v2/...: their refusals are {"error": "..."} too."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.core import endpoints
    from service.core.running import Running
    from service.http.guards import AddRetryAfter, AdmitWhenRoom, RequireApiKey, UniformErrors
    from service.runtime.admission import Admission

    counter = SimpleNamespace(inc=lambda: None)
    admission = Admission(budget_seconds=0.1, initial_rate=10.0)
    assert admission.try_admit(5) and admission.full()  # half a second of work admitted: no room
    full = SimpleNamespace(admission=admission,
                           metrics=SimpleNamespace(refusals=SimpleNamespace(labels=lambda *labels: counter)))
    running = Running()
    running.service = SimpleNamespace(pipeline=full)  # a worker whose pipeline is full
    assert endpoints.is_sheddable("POST", "/v2/models/m/versions/2/infer")
    assert endpoints.find("/v2/models/m/infer").label == "v2_infer"
    assert endpoints.is_open("/v2/health/ready") and not endpoints.is_open("/v2/models/m")

    async def reached(request):
        return PlainTextResponse("reached")

    inner = Starlette(routes=[Route("/v2/models/{m}/infer", reached, methods=["POST"])])
    app = UniformErrors(AddRetryAfter(RequireApiKey(AdmitWhenRoom(inner, retry_after_s=1, running=running), setting="k"), retry_after_s=1))

    async def call(headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v2/models/m/infer", content=b"{}", headers=headers)

    shed = asyncio.run(call({"Authorization": "Bearer k"}))
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert list(shed.json()) == ["error"] and shed.json()["error"].startswith("overloaded: ")
    unauthorized = asyncio.run(call({}))
    assert unauthorized.status_code == 401 and list(unauthorized.json()) == ["error"]


def test_amended_spec_lists_the_oip_routes_and_stays_valid_openapi():
    """amend_docs on a spec as BentoML writes it, in process: the protocol's routes, valid OpenAPI 3.1
    (before a model is loaded: the store's model name as the example, no version)."""
    from openapi_spec_validator import validate

    from service.core.running import Running
    from service.http.rewrites import amend_docs

    bentoml_spec = {"openapi": "3.0.2", "info": {"title": "CNNService", "version": "None"}, "paths": {},
                    "components": {"schemas": {"InvalidArgument": {"type": "object"}}},
                    "tags": [{"name": "Service APIs"}]}
    sent = []

    async def send(message):
        sent.append(message)

    async def serve():
        wrapped = amend_docs(send, Running())  # the service not started yet
        await wrapped({"type": "http.response.start", "status": 200,
                       "headers": [(b"content-type", b"application/json")]})
        await wrapped({"type": "http.response.body", "body": json.dumps(bentoml_spec).encode()})

    for _ in range(2):  # the same spec each time (nothing shared is rewritten in place)
        sent.clear()
        asyncio.run(serve())
        spec = json.loads(sent[-1]["body"])
        validate(spec)
        assert {path for path in spec["paths"] if path.startswith("/v2")} == set(OIP_PATHS)
        assert [tag["name"] for tag in spec["tags"]] == ["Service APIs", "Open Inference Protocol (KServe v2)"]
        infer = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
        assert infer["parameters"][0]["example"] == "cnn-classifier"
        assert {"200", "400", "401", "404", "413", "422", "503"} == set(infer["responses"])
        assert infer["responses"]["503"]["headers"]["Retry-After"]


# ----- the README's examples, as written ----------------------------------------------------------


@pytest.mark.slow
def test_readme_oip_examples_run_as_written(server, images, tmp_path):
    for name, path in images.items():
        (tmp_path / name).write_bytes(path.read_bytes())
    program = code_block("python", "tritonclient.http").replace("127.0.0.1:3000", server.url.removeprefix("http://"))
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout.strip().splitlines()
    assert len(printed) == 3 and "conv1 (2, 2, " in printed[1]
    block = code_block("bash", "/v2/models/cnn-classifier")
    commands = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(commands) == 2
    for command in commands:
        command = command.replace("http://127.0.0.1:3000", server.url)
        run = subprocess.run(f"{command} --fail-with-body -sS", shell=True, cwd=tmp_path, capture_output=True,
                             timeout=120)
        assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-2000:])
        answer = json.loads(run.stdout)
        assert answer["name" if "inputs" in answer else "model_name"] == "cnn-classifier"
