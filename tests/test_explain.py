"""Attributions through Captum: each method on the model and served at POST /explain, their bounds,
and occlusion finding the one region an image's score depends on."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.attribution import METHODS, AttributionRequest, attribute
from model.config import get_preset
from model.errors import ClassOutOfRange, ModelRequestError, UnknownLayer
from model.network import AlexNet
from testkit.images import encode, shape_png


@pytest.fixture(scope="module")
def small_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(get_preset("small").config).eval()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_a_finite_map_of_the_input_size(small_model, method):
    inputs = torch.randn(1, 3, 64, 64)
    request = AttributionRequest(method, steps=8).resolved(small_model)
    found = attribute(small_model, inputs, request)
    assert found.input_map.shape == (64, 64) and torch.isfinite(found.input_map).all()
    assert found.class_index == int(small_model(inputs).argmax()) and 0 <= found.probability <= 1
    assert (found.input_map >= 0).all() or found.signed
    assert all(p.grad is None for p in small_model.parameters())


def _one_region_image(side: int = 64) -> torch.Tensor:
    """A normalized input that is exactly the occlusion baseline (0: the mean colour) everywhere but a
    16x16 checker in the top-left quadrant: occluding anywhere else changes nothing."""
    x = torch.zeros(1, 3, side, side)
    pattern = (torch.arange(16)[:, None] // 4 + torch.arange(16)[None, :] // 4) % 2 * 4.0 - 2.0
    x[0, :, 4:20, 6:22] = pattern
    return x


def test_occlusion_puts_the_attribution_on_the_region_the_score_depends_on(small_model):
    x = _one_region_image()
    found = attribute(small_model, x, AttributionRequest("occlusion", window=8, stride=8).resolved(small_model))
    magnitude = found.input_map.abs()
    assert magnitude[:32, :32].sum() > 0.99 * magnitude.sum()  # the top-left quadrant carries it all
    # windows there never touch the checker: nothing changes but float rounding (batched forwards)
    assert magnitude[40:, 40:].max() < 1e-4 * magnitude.max()


@pytest.mark.parametrize("request_, error", [
    (AttributionRequest("lime"), ModelRequestError),
    (AttributionRequest("occlusion", window=65), ModelRequestError),  # larger than the 64 px input
    (AttributionRequest("occlusion", window=4, stride=1), ModelRequestError),  # 61 x 61 positions
    (AttributionRequest("occlusion", window=8, stride=9), ModelRequestError),
    (AttributionRequest("integrated_gradients", steps=500), ModelRequestError),
    (AttributionRequest("gradcam", layer="fc6"), UnknownLayer),
    (AttributionRequest("gradcam", class_index=12), ClassOutOfRange),
])
def test_parameters_are_bounded(small_model, request_, error):
    with pytest.raises(error):
        request_.resolved(small_model)


def test_costs_count_forward_passes(small_model):
    occlusion = AttributionRequest("occlusion", window=16, stride=8).resolved(small_model)
    assert occlusion.cost(64) == 7 * 7 + 1
    assert AttributionRequest("integrated_gradients", steps=16).resolved(small_model).cost(64) == 33


# ----- served -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_explain_endpoint_answers_every_method(server, method):
    response = httpx.post(f"{server.url}/explain", files=[("image", ("x.png", shape_png(4), "image/png"))],
                          data={"method": method, "steps": "8"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == method and body["input_size"] == 64 and body["attribution"]["shape"] == [64, 64]
    values = np.frombuffer(base64.b64decode(body["attribution"]["data"]), dtype="<f2")
    assert np.isfinite(values).all() and body["forward_passes"] >= 3
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.mode == "RGBA" and overlay.size == (64, 64)


@pytest.mark.slow
def test_served_occlusion_finds_the_region(server):
    """The same image sent as a PNG (its pixels the small preset's mean grey but for the checker)."""
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    pixels[4:20, 6:22] = ((np.arange(16)[:, None] // 4 + np.arange(16)[None, :] // 4) % 2 * 255)[..., None]
    body = httpx.post(f"{server.url}/explain", json={
        "image_base64": base64.b64encode(encode(Image.fromarray(pixels))).decode(), "method": "occlusion",
        "window": 8, "stride": 8}, timeout=60).json()
    values = np.abs(np.frombuffer(base64.b64decode(body["attribution"]["data"]), dtype="<f2").astype(np.float32))
    values = values.reshape(64, 64)
    quadrants = [values[:32, :32], values[:32, 32:], values[32:, :32], values[32:, 32:]]
    # grey 128 is a hair off the mean 127.5, so occluding it moves the score a little: not exactly 0
    assert all(quadrants[0].mean() > 5 * other.mean() for other in quadrants[1:])
    row, col = np.unravel_index(values.argmax(), values.shape)
    assert row < 24 and col < 24  # the strongest window overlaps the checker


@pytest.mark.slow
@pytest.mark.parametrize("payload, status, reason", [
    ({"method": "lime"}, 400, None),
    ({"method": "occlusion", "window": 100}, 422, "bad_attribution_parameters"),
    ({"method": "occlusion", "window": 4, "stride": 1}, 422, "bad_attribution_parameters"),
    ({"method": "gradcam", "layer": "fc6"}, 422, "unknown_layer"),
    ({"method": "gradcam", "class_index": 99}, 422, "class_out_of_range"),
    ({"method": "integrated_gradients", "steps": 1000}, 400, None),
])
def test_explain_refusals(server, payload, status, reason):
    response = httpx.post(f"{server.url}/explain", json={"image_base64": base64.b64encode(shape_png(1)).decode(),
                                                         **payload}, timeout=60)
    assert response.status_code == status, response.text
    if reason:
        assert response.json()["error"] == reason
