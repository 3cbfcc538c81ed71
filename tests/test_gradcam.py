"""Grad-CAM, checked against the definition computed another way (hooks on a whole-model forward)."""

from __future__ import annotations

import pytest
import torch

from model.config import get_preset
from model.gradcam import grad_cam
from model.network import AlexNet


def reference_grad_cam(model: AlexNet, inputs: torch.Tensor, layer: str, class_index: int) -> torch.Tensor:
    """The paper's recipe with a forward hook: keep A, take dy_c/dA, weigh channels by mean gradient."""
    kept = {}
    module = model.get_submodule(model.named_layers[layer].post_relu_module)
    handle = module.register_forward_hook(lambda _m, _i, output: kept.setdefault("A", output))
    logits = model(inputs)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, class_index], kept["A"])
    cam = torch.relu((gradient[0].mean(dim=(1, 2))[:, None, None] * kept["A"][0]).sum(0))
    return cam / cam.max().clamp(min=1e-12)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return AlexNet(get_preset("small").config).eval()


@pytest.mark.parametrize("layer", ["conv3", "conv5"])
def test_grad_cam_matches_the_definition(small_model, layer):
    torch.manual_seed(1)
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        top = int(small_model(inputs).argmax())
    cam = grad_cam(small_model, inputs, layer)
    assert cam.class_index == top
    torch.testing.assert_close(cam.layer_map, reference_grad_cam(small_model, inputs, layer, top))
    # the small net's conv3..conv5 are 8x8 (stride-2 conv1, two pools); the heat map is at input size
    assert cam.layer_map.shape == (8, 8) and cam.heatmap.shape == (64, 64)
    assert 0 <= float(cam.heatmap.min()) and float(cam.heatmap.max()) <= 1


def test_grad_cam_explains_a_chosen_class(small_model):
    inputs = torch.randn(1, 3, 64, 64)
    cam = grad_cam(small_model, inputs, "conv5", class_index=3)
    assert cam.class_index == 3
    torch.testing.assert_close(cam.layer_map, reference_grad_cam(small_model, inputs, "conv5", 3))


def test_grad_cam_needs_a_conv_layer(small_model):
    with pytest.raises(KeyError, match="conv layer"):
        grad_cam(small_model, torch.randn(1, 3, 64, 64), "fc6")


def test_grad_cam_leaves_no_gradients_on_the_weights(small_model):
    grad_cam(small_model, torch.randn(1, 3, 64, 64), "conv5")
    assert all(p.grad is None for p in small_model.parameters())
