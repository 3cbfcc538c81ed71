"""First contact with a photo model: `python -m training imagenet` (`make serve-imagenet`) from a file
in torchvision's cache to a served model answering with ImageNet's class names, its model card, its
samples and the low-confidence mark; and the message an offline machine gets.

The download itself cannot run here (no internet): the weights file is placed where torchvision's
weights API keeps it ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth), in torchvision's own
format -- a state dict of `torchvision.models.alexnet()` -- and every step after the download runs for
real. Its weights are torchvision's random initialisation, so every answer is unsure: 1,000 classes
at about 0.1% each.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import bentoml
import httpx
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from torchvision.models import AlexNet_Weights

from model.checkpoint import load_checkpoint
from model.preprocess import Normalizer, load_image
from testkit.server import ROOT, start_server
from tests.test_ui import CHROMIUM, browser, open_ui  # noqa: F401 (browser: the module's Chromium fixture)

pytestmark = pytest.mark.slow
WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
CATEGORIES = list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def torchvision_state(tmp_path_factory) -> tuple[dict, dict]:
    """TORCH_HOME with the weights file in torchvision's cache, and the state dict it holds."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / WEIGHTS_FILE)
    return {"TORCH_HOME": str(torch_home)}, state


@pytest.fixture(scope="module")
def imagenet_run(cli_env, torchvision_state, tmp_path_factory):
    """The command `make serve-imagenet` runs, with a channel atlas from a folder of the user's photos."""
    env, _ = torchvision_state
    photos = tmp_path_factory.mktemp("my_photos")
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        (photos / f"{name}.png").write_bytes(png(getattr(skimage.data, name)()))
    out = tmp_path_factory.mktemp("alexnet-imagenet")
    result = subprocess.run([sys.executable, "-m", "training", "imagenet", "--out", str(out), "--atlas", str(photos)],
                            cwd=ROOT, env={**cli_env, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


@pytest.fixture(scope="module")
def imagenet_server(cli_env, imagenet_run, tmp_path_factory):
    server = start_server(cli_env, tmp_path_factory.mktemp("imagenet_server"), MODEL_TAG="alexnet-imagenet:latest",
                          PRECISION="fp32", API_WORKERS="1")
    yield server
    server.stop()


def test_offline_it_fails_at_once_naming_the_file_where_to_put_it_and_what_to_run(cli_env, tmp_path):
    # No network here is what an offline machine has; a proxy on a closed port makes it certain.
    offline = {**cli_env, "TORCH_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "training", "imagenet", "--out", str(tmp_path / "out")],
                            cwd=ROOT, env=offline, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE) in result.stderr  # where to put it by hand
    assert "https://download.pytorch.org/models/" + WEIGHTS_FILE in result.stderr  # the file
    assert "make serve-imagenet" in result.stderr  # what to run then
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_the_served_model_answers_with_imagenet_classes_as_torchvision_computes_them(
        imagenet_server, torchvision_state, imagenet_run):
    _, state = torchvision_state
    reference = torchvision.models.alexnet(weights=None)
    reference.load_state_dict(state)
    checkpoint = load_checkpoint(imagenet_run[0])
    photo = png(skimage.data.chelsea())
    pixels = load_image(photo, checkpoint.manifest.preprocessing).unsqueeze(0)  # the service's own preprocessing
    with torch.no_grad():
        expected = torch.softmax(reference.eval()(Normalizer(checkpoint.manifest.preprocessing)(pixels)), 1)[0]

    client = bentoml.SyncHTTPClient(imagenet_server.url, timeout=60)  # as a Python user calls it
    try:
        body = client.classify(images_base64=[base64.b64encode(photo).decode()], top_k=5)
    finally:
        client.close()
    assert body["model"].startswith("alexnet-imagenet:")
    (prediction,) = body["predictions"]
    for entry in prediction["top_k"]:
        assert entry["label"] == CATEGORIES[entry["index"]]
        assert entry["probability"] == pytest.approx(expected[entry["index"]].item(), rel=1e-3)
    assert [e["index"] for e in prediction["top_k"]][:1] == [int(expected.argmax())]
    assert prediction["low_confidence"] is True  # random weights: about 0.1% for each class


def test_the_model_card_says_what_it_knows(imagenet_server, imagenet_run):
    card = httpx.get(f"{imagenet_server.url}/model", timeout=30).json()["card"]
    assert card["dataset"] == "imagenet-1k" and card["num_classes"] == 1000 and card["preset"] == "torchvision"
    assert card["test_top1"] == pytest.approx(0.56522)  # torchvision's published figure for these weights
    assert "ImageNet" in card["purpose"] and card["version"].startswith("alexnet-imagenet:")
    assert card["atlas"] is True and card["low_confidence_below"] == 0.5
    # the atlas was built from the user's folder of photos
    patches = httpx.get(f"{imagenet_server.url}/atlas", params={"layer": "conv1", "channel": 0}, timeout=30).json()
    assert {p["source"] for p in patches["patches"]} <= {"chelsea.png", "coffee.png", "rocket.png", "astronaut.png"}
    # photos to try, not shapes
    samples = httpx.get(f"{imagenet_server.url}/samples", timeout=30).json()["samples"]
    assert [s["name"] for s in samples] == card["samples"] == ["cat", "coffee", "rocket", "astronaut"]
    cat = httpx.get(f"{imagenet_server.url}/samples/cat", timeout=30)
    assert cat.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(cat.content)).size == (451, 300)
    missing = httpx.get(f"{imagenet_server.url}/samples/stripes_vertical", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "no_such_sample"


def test_registering_again_is_not_needed_to_serve_twice(imagenet_run, cli_env):
    """`make serve-imagenet` converts once: the model store has it afterwards."""
    out, stdout = imagenet_run
    assert "registered alexnet-imagenet:" in stdout
    result = subprocess.run(
        [sys.executable, "-c", "from model.store import has_model; print(has_model('alexnet-imagenet:latest'))"],
        cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps)")
def test_the_page_shows_the_card_the_photo_samples_and_the_low_confidence_mark(browser, imagenet_server):  # noqa: F811
    page, problems = open_ui(browser, imagenet_server.url)
    page.wait_for_selector("#card-panel:not([hidden])", timeout=30_000)
    assert "ImageNet" in page.locator("#card-purpose").inner_text()
    assert "56.5%" in page.locator("[data-fact='top-1 accuracy']").inner_text()
    assert "imagenet-1k" in page.locator("[data-fact=dataset]").inner_text()
    page.click("#card-classes summary")
    page.fill("#class-search", "tabby")
    page.wait_for_function("() => document.querySelectorAll('#class-list li').length === 1", timeout=10_000)
    assert page.locator("#class-list li").inner_text() == "tabby (281)"
    page.click("button[data-sample=cat]")
    page.wait_for_selector(".prediction", timeout=60_000)
    page.wait_for_selector("#low-confidence:not([hidden])", timeout=30_000)
    assert "Low confidence" in page.locator("#low-confidence").inner_text()
    assert "imagenet-1k" in page.locator("#low-confidence").inner_text()
    assert problems == []
    page.close()
