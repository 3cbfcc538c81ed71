"""Where in the image a prediction comes from: the classic attribution methods, through Captum.

  gradcam               Grad-CAM (Selvaraju et al. 2017): a conv layer's maps weighted by the mean
                        gradient of the class score -- coarse (the layer's resolution), class-specific.
  guided_backprop       the input gradient with ReLUs that pass back only positive gradients
                        (Springenberg et al. 2015): fine edges of what the class score responds to.
  deconvolution         Zeiler & Fergus (2014)'s deconvnet: activations projected back to pixels
                        through "unpooled", rectified, transposed convolutions.
  occlusion             Zeiler & Fergus's other experiment: slide a gray square over the image and
                        record how much the class score drops; positive where the evidence is.
  integrated_gradients  Sundararajan et al. (2017): gradients averaged along the path from a gray
                        image to this one, times the difference; sums to the score's change.

All run on the fp32 network as trained (gradients need it), on the normalized
input, for the top class or a chosen one. The result is a map at the input's
size: Grad-CAM's in [0, 1]; guided backprop and deconvolution as the largest
absolute value over the colour channels (>= 0); occlusion and integrated
gradients summed over the colour channels, signed (positive: evidence for the
class). "Gray" is the input normalization's mean colour (0 after normalizing).

Occlusion and integrated gradients cost many forward passes; the caller bounds
them (windows, steps) and `cost` tells how many to expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from captum.attr import (
    Deconvolution, GuidedBackprop, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion,
)

from model.errors import ModelRequestError
from model.network import AlexNet

METHODS = ("gradcam", "guided_backprop", "deconvolution", "occlusion", "integrated_gradients")
SIGNED = {"occlusion", "integrated_gradients"}
MAX_OCCLUSION_WINDOWS = 64  # 8 x 8 positions: ~0.8 s for AlexNet in fp32 on 2 cores (BENCHMARKS.md)
MAX_STEPS = 32  # ~0.9 s for AlexNet
BATCH = 16  # perturbed images per forward pass (occlusion, integrated gradients)


class BadAttributionRequest(ModelRequestError):
    reason = "bad_attribution_parameters"


@dataclass(frozen=True)
class AttributionRequest:
    method: str = "gradcam"
    class_index: int | None = None
    layer: str | None = None  # gradcam: a conv layer (default: the last)
    window: int | None = None  # occlusion: side of the gray square (default: a quarter of the input)
    stride: int | None = None  # occlusion: its step (default: half the window)
    steps: int = 16  # integrated gradients: points on the path

    def resolved(self, network: AlexNet) -> AttributionRequest:
        """The request with defaults filled in and every bound checked (raises the typed errors)."""
        if self.method not in METHODS:
            raise BadAttributionRequest(f"unknown method {self.method!r}; one of {list(METHODS)}")
        network.check_class(self.class_index)
        side = network.config.input_size
        layer, window, stride = self.layer, self.window, self.stride
        if self.method == "gradcam":
            layer = layer or network.conv_layers[-1]
            network.check_conv_layer(layer)
        if self.method == "occlusion":
            window = window or max(2, side // 4)
            stride = stride or max(1, window // 2)
            if not 2 <= window <= side:
                raise BadAttributionRequest(f"window must be 2..{side} pixels (the input is {side}x{side})")
            if not 1 <= stride <= window:
                raise BadAttributionRequest(f"stride must be 1..{window} (the window)")
            if occlusion_windows(side, window, stride) > MAX_OCCLUSION_WINDOWS:
                raise BadAttributionRequest(
                    f"{occlusion_windows(side, window, stride)} window positions; at most {MAX_OCCLUSION_WINDOWS}:"
                    " use a larger window or stride")
        if self.method == "integrated_gradients" and not 2 <= self.steps <= MAX_STEPS:
            raise BadAttributionRequest(f"steps must be 2..{MAX_STEPS}")
        return AttributionRequest(self.method, self.class_index, layer, window, stride, self.steps)

    def cost(self, side: int) -> int:
        """About how many single-image forward passes the method takes (for admission control)."""
        if self.method == "occlusion":
            return occlusion_windows(side, self.window, self.stride) + 1
        if self.method == "integrated_gradients":
            return 2 * self.steps + 1
        return 3  # a forward and a backward pass


def occlusion_windows(side: int, window: int, stride: int) -> int:
    return ((side - window) // stride + 1) ** 2


@dataclass
class Attribution:
    method: str
    class_index: int
    probability: float
    input_map: torch.Tensor  # (S, S) float32 on CPU
    signed: bool
    layer_map: torch.Tensor | None = None  # Grad-CAM: at the layer's resolution, in [0, 1]


def attribute(network: AlexNet, inputs: torch.Tensor, request: AttributionRequest) -> Attribution:
    """Attribution of one normalized input (1, 3, S, S) for `request` (already `resolved`)."""
    network.eval()
    with torch.no_grad():
        probabilities = network(inputs).float().softmax(dim=1)[0]
    target = int(probabilities.argmax()) if request.class_index is None else request.class_index
    side = inputs.shape[-1]
    layer_map = None
    with torch.enable_grad():
        x = inputs.detach().float().requires_grad_(True)
        if request.method == "gradcam":
            relu = network.get_submodule(network.named_layers[request.layer].post_relu_module)
            cam = LayerGradCam(network, relu).attribute(x, target=target, relu_attributions=True).detach()[0, 0]
            layer_map = cam / cam.max().clamp(min=1e-12)  # all zero when nothing argues for the class
            upsampled = LayerAttribution.interpolate(layer_map[None, None], (side, side), "bilinear")
            result = upsampled[0, 0].clamp(0, 1)
        elif request.method in ("guided_backprop", "deconvolution"):
            method = GuidedBackprop(network) if request.method == "guided_backprop" else Deconvolution(network)
            result = method.attribute(x, target=target).detach()[0].abs().amax(dim=0)
        elif request.method == "occlusion":
            result = Occlusion(network).attribute(
                x, target=target, baselines=0.0, sliding_window_shapes=(3, request.window, request.window),
                strides=(3, request.stride, request.stride), perturbations_per_eval=BATCH,
            ).detach()[0].sum(dim=0)
        else:
            result = IntegratedGradients(network).attribute(
                x, target=target, baselines=0.0, n_steps=request.steps, internal_batch_size=BATCH,
            ).detach()[0].sum(dim=0)
    network.zero_grad(set_to_none=True)
    return Attribution(request.method, target, float(probabilities[target]), result.float().cpu(),
                       request.method in SIGNED, None if layer_map is None else layer_map.float().cpu())
