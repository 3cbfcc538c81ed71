"""The service the way its users call it: BentoML's own clients on every endpoint, a client
generated from the OpenAPI spec, the spec's validity, and the README's examples, run as written."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException

from testkit.docs import code_block

pytestmark = pytest.mark.slow
METHODS = ("gradcam", "guided_backprop", "deconvolution", "occlusion", "integrated_gradients")


def _float16(payload: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(payload["data"]), dtype="<f2").reshape(payload["shape"])


def check_every_endpoint(call, images: dict[str, Path]) -> None:
    """The calls a user makes, and what the answers must hold; `call(name, **kwargs)` returns the answer."""
    cat, dog = images["cat.jpg"], images["dog.png"]
    classified = call("classify", images=[cat, dog], top_k=3)
    assert [len(p["top_k"]) for p in classified["predictions"]] == [3, 3]
    by_base64 = call("classify", images_base64=[base64.b64encode(cat.read_bytes()).decode()])
    assert by_base64["predictions"][0]["top_k"][0] == call("classify", images=[cat])["predictions"][0]["top_k"][0]
    for normalize in (True, False):
        embedded = call("embed", images=[cat], normalize=normalize)
        norm = float(np.linalg.norm(embedded["embeddings"][0]))
        assert embedded["dim"] == 256 and (abs(norm - 1) < 1e-3) == normalize
    for stage in ("pre_relu", "post_relu"):
        for fmt in ("png", "array", "stats"):
            maps = call("feature_maps", image=cat, layers=["conv1", "conv3"], format=fmt, stage=stage,
                        top_channels=4)
            for layer in maps["layers"]:
                assert len(layer["channels"]) == 4
                assert {"png": layer["png"], "array": layer["array"], "stats": layer["stats"]}[fmt]
                assert layer["stats"] == [] or fmt == "stats"
            if fmt == "array":
                assert _float16(maps["layers"][0]["array"]).shape == (4, 32, 32)
    chosen = call("feature_maps", image=dog, layers=["fc7"], channels=[0, 3], format="array")
    assert _float16(chosen["layers"][0]["array"]).shape == (2,)
    cam = call("gradcam", image=cat, layer="conv4", class_index=2)
    assert (cam["layer"], cam["class_index"]) == ("conv4", 2)
    for method in METHODS:
        explained = call("explain", image=dog, method=method, steps=4)
        assert explained["method"] == method and _float16(explained["attribution"]).shape == (64, 64)


def check_refusal(call, images) -> None:
    with pytest.raises(BentoMLException) as refused:
        call("classify", images_base64=["***"])
    assert json.loads(str(refused.value)) == {"error": "invalid_base64",
                                              "detail": "`images_base64[0]` is not valid base64"}
    with pytest.raises(BentoMLException) as refused:
        call("feature_maps", image=images["cat.jpg"], layers=["conv9"])
    assert json.loads(str(refused.value))["error"] == "unknown_layer"


def test_sync_http_client_calls_every_endpoint(server, images):
    with bentoml.SyncHTTPClient(server.url) as client:
        def call(name, **kwargs):
            return getattr(client, name)(**kwargs)

        check_every_endpoint(call, images)
        check_refusal(call, images)


def test_async_http_client_calls_every_endpoint(server, images):
    async def main():
        async with bentoml.AsyncHTTPClient(server.url) as client:
            results = {}

            def call(name, **kwargs):  # run each call to completion in this loop's thread
                return asyncio.run_coroutine_threadsafe(getattr(client, name)(**kwargs), loop).result(120)

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(check_every_endpoint, call, images)
            await asyncio.to_thread(check_refusal, call, images)
            # and concurrently, as async clients are used (as base64: concurrent file uploads through one
            # AsyncHTTPClient share its open-file list, and the first call to finish closes the others' files)
            data = base64.b64encode(images["cat.jpg"].read_bytes()).decode()
            answers = await asyncio.gather(*(client.classify(images_base64=[data]) for _ in range(8)))
            results["labels"] = {a["predictions"][0]["top_k"][0]["label"] for a in answers}
            return results

    assert len(asyncio.run(main())["labels"]) == 1  # the same image, the same answer, however batched


def test_the_openapi_spec_is_valid(server):
    from openapi_spec_validator import validate

    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    validate(spec)  # raises on the first violation
    assert spec["openapi"].startswith("3.1")
    explain = spec["paths"]["/explain"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "null" in explain["properties"]["stride"]["type"]  # optional fields keep their null


def test_a_client_generated_from_the_spec_works(server, images, tmp_path):
    """openapi-python-client, as its users run it, against /docs.json; then /classify and /feature_maps."""
    config = tmp_path / "config.yml"
    config.write_text("project_name_override: cnn-client\npackage_name_override: cnn_client\npost_hooks: []\n")
    generator = Path(sys.executable).parent / "openapi-python-client"
    result = subprocess.run([str(generator), "generate", "--url", f"{server.url}/docs.json", "--config", str(config),
                             "--meta", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    program = f"""
import io, base64, json
from cnn_client import Client
from cnn_client.api.service_ap_is import cnn_service_classify, cnn_service_feature_maps
from cnn_client.models import CnnServiceClassifyFilesInput, CnnServiceFeatureMapsJsonInput
from cnn_client.models.cnn_service_feature_maps_json_input_format import CnnServiceFeatureMapsJsonInputFormat
from cnn_client.types import File

client = Client(base_url={server.url!r}, timeout=60)
cat = open({str(images["cat.jpg"])!r}, "rb").read()
# a multipart upload, and a JSON body with the image in base64
classified = cnn_service_classify.sync(client=client, body=CnnServiceClassifyFilesInput(
    images=[File(payload=io.BytesIO(cat), file_name="cat.jpg", mime_type="image/jpeg")], top_k=2))
maps = cnn_service_feature_maps.sync(client=client, body=CnnServiceFeatureMapsJsonInput(
    image_base64=base64.b64encode(cat).decode(), layers=["conv2"],
    format_=CnnServiceFeatureMapsJsonInputFormat.STATS, top_channels=3))
print(json.dumps({{"labels": [s.label for s in classified.predictions[0].top_k],
                  "layer": maps.layers[0].layer, "stats": len(maps.layers[0].stats)}}))
"""
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout)
    assert len(answer["labels"]) == 2 and answer["layer"] == "conv2" and answer["stats"] == 3


# ----- the README's examples, extracted from README.md itself ---------------------------------




def readme_curl_commands() -> list[str]:
    """Every curl command of the README's "First requests" block, continuation lines joined."""
    block = code_block("bash", "curl -F images=@cat.jpg").replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip().startswith("curl ")]


def test_the_readme_has_the_examples_these_tests_run():
    commands = readme_curl_commands()
    assert len(commands) >= 8 and any("/explain" in c for c in commands) and any("/atlas" in c for c in commands)


@pytest.mark.parametrize("command", readme_curl_commands())
def test_readme_curl_example_works(server, images, command, tmp_path):
    for name, path in images.items():
        (tmp_path / name).write_bytes(path.read_bytes())
    command = command.replace("http://127.0.0.1:3000", server.url)
    # as written, plus: fail on an HTTP error, and print the status
    result = subprocess.run(f"{command} --fail-with-body -sS -w '\\n%{{http_code}}'", shell=True, cwd=tmp_path,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    assert result.stdout.rstrip().endswith(b"200")


def test_readme_python_example_prints_results(server, images, tmp_path):
    for name, path in images.items():
        (tmp_path / name).write_bytes(path.read_bytes())
    program = code_block("python", "bentoml.SyncHTTPClient").replace("http://127.0.0.1:3000", server.url)
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout.strip().splitlines()
    assert len(printed) >= 3 and all(line.strip() for line in printed)
