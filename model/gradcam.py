"""Grad-CAM: where in the image the evidence for a class lies.

Selvaraju et al. (2017). Take the feature maps A_k of a conv layer (conv5 by
default: the last, most class-specific maps that still have a spatial
layout) and the gradient of the class score y_c with respect to them. Each
channel's weight is its gradient averaged over the map,

    alpha_k = mean_{i,j} dy_c / dA_k[i, j],

and the class-activation map is ReLU(sum_k alpha_k A_k): the channels that
raise the class score, where they fire. The map has the layer's resolution
(13x13 for AlexNet's conv5, each cell seeing a receptive field of the input)
and is upsampled to the input for display.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.network import AlexNet


@dataclass
class ClassActivationMap:
    class_index: int
    probability: float
    layer_map: torch.Tensor  # (h, w) at the layer's resolution, in [0, 1]
    heatmap: torch.Tensor  # (S, S) upsampled to the input, in [0, 1]


def grad_cam(model: AlexNet, inputs: torch.Tensor, layer: str, class_index: int | None = None) -> ClassActivationMap:
    """Grad-CAM of one normalized input (1, 3, S, S) at a conv layer's post-ReLU maps.

    class_index None explains the top-1 class. Runs in fp32 with gradients,
    so it costs about one forward and one backward pass.
    """
    model.check_conv_layer(layer)
    model.check_class(class_index)
    named = model.named_layers[layer]
    with torch.enable_grad():
        x = inputs.float()
        maps = None
        for module_name, module in model.named_children():
            x = module(x)
            if module_name == named.post_relu_module:
                maps = x.detach().requires_grad_(True)
                x = maps
        logits = x
        probabilities = logits.detach().softmax(dim=1)[0]
        index = int(probabilities.argmax()) if class_index is None else class_index
        (gradients,) = torch.autograd.grad(logits[0, index], maps)
    weights = gradients[0].mean(dim=(1, 2))  # alpha_k: one number per channel
    cam = torch.relu((weights[:, None, None] * maps[0].detach()).sum(dim=0))
    cam = cam / cam.max().clamp(min=1e-12)  # all zero when nothing argues for the class
    size = inputs.shape[-2:]
    heatmap = nn.functional.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return ClassActivationMap(index, float(probabilities[index]), cam.cpu(), heatmap.clamp(0, 1).cpu())
