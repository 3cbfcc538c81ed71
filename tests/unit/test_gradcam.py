"""Grad-CAM (Captum's LayerGradCam), checked against the definition computed another way (hooks on a
whole-model forward) and against the hand-written implementation it replaced."""

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


def handwritten_grad_cam(model: AlexNet, inputs: torch.Tensor, layer: str, class_index: int | None = None):
    """The project's own Grad-CAM before Captum's replaced it (model/gradcam.py until 2026-11-25)."""
    named = model.named_layers[layer]
    with torch.enable_grad():
        x = inputs.float()
        maps = None
        for module_name, module in model.named_children():
            x = module(x)
            if module_name == named.post_relu_module:
                maps = x.detach().requires_grad_(True)
                x = maps
        probabilities = x.detach().softmax(dim=1)[0]
        index = int(probabilities.argmax()) if class_index is None else class_index
        (gradients,) = torch.autograd.grad(x[0, index], maps)
    cam = torch.relu((gradients[0].mean(dim=(1, 2))[:, None, None] * maps[0].detach()).sum(dim=0))
    cam = cam / cam.max().clamp(min=1e-12)
    heatmap = torch.nn.functional.interpolate(cam[None, None], size=inputs.shape[-2:], mode="bilinear",
                                              align_corners=False)[0, 0]
    return index, float(probabilities[index]), cam, heatmap.clamp(0, 1)


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


@pytest.mark.parametrize("preset, layer", [("small", "conv2"), ("small", "conv5"), ("alexnet", "conv5")])
def test_captum_grad_cam_agrees_with_the_handwritten_one_it_replaced(preset, layer):
    torch.manual_seed(2)
    model = AlexNet(get_preset(preset).config).eval()
    size = model.config.input_size
    inputs = torch.randn(1, 3, size, size)
    index, probability, layer_map, heatmap = handwritten_grad_cam(model, inputs, layer)
    cam = grad_cam(model, inputs, layer)
    assert cam.class_index == index and cam.probability == pytest.approx(probability, abs=1e-6)
    torch.testing.assert_close(cam.layer_map, layer_map, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cam.heatmap, heatmap, atol=1e-6, rtol=1e-5)
