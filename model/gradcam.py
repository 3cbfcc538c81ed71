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

Computed by Captum's LayerGradCam (model.attribution), which agrees with the
hand-written version this project used before to 1e-6 (tests/unit/test_gradcam.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attribution import AttributionRequest, attribute
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
    so it costs about one forward and one backward pass."""
    request = AttributionRequest("gradcam", class_index, layer).resolved(model)
    found = attribute(model, inputs, request)
    return ClassActivationMap(found.class_index, found.probability, found.layer_map, found.input_map)
