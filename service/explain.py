"""/gradcam and /explain: where in one image the evidence for a class lies, shaped for the response."""

from __future__ import annotations

import base64

import anyio
import numpy as np
import torch

from model.summary import LayerInfo
from model.visualize import encode_png, heatmap_rgba
from service.feature_maps import float16_payload
from model.attribution import AttributionRequest
from service.schemas import ExplainResponse, GradCamResponse


async def gradcam(backend, layers_table: dict[str, LayerInfo], class_names: list[str], model_tag: str,
                  input_size: int, image: np.ndarray, layer: str | None, class_index: int | None) -> GradCamResponse:
    layer = layer or [name for name, row in layers_table.items() if row.type == "conv"][-1]
    cam = await backend.grad_cam(image, layer, class_index)
    layer_map = torch.from_numpy(cam.layer_map)
    heatmap = torch.nn.functional.interpolate(layer_map[None, None], size=(input_size, input_size),
                                              mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    png = await anyio.to_thread.run_sync(lambda: encode_png(heatmap_rgba(heatmap)))
    row = layers_table[layer]
    return GradCamResponse(
        model=model_tag, layer=layer, class_index=cam.class_index, label=class_names[cam.class_index],
        probability=cam.probability, input_size=input_size, layer_map=float16_payload(layer_map),
        receptive_field=row.receptive_field, jump=row.jump, heatmap_png=base64.b64encode(png).decode(),
    )


async def explain(backend, class_names: list[str], model_tag: str, input_size: int, image: np.ndarray,
                  request: AttributionRequest) -> ExplainResponse:
    found = await backend.explain(image, request)
    attribution = torch.from_numpy(found.input_map)
    evidence = attribution.clamp(min=0)
    heat = evidence / evidence.max().clamp(min=1e-12)
    png = await anyio.to_thread.run_sync(lambda: encode_png(heatmap_rgba(heat)))
    return ExplainResponse(
        model=model_tag, method=request.method, class_index=found.class_index, label=class_names[found.class_index],
        probability=found.probability, input_size=input_size, signed=found.signed,
        attribution=float16_payload(attribution), overlay_png=base64.b64encode(png).decode(),
        layer=request.layer, window=request.window, stride=request.stride,
        steps=request.steps if request.method == "integrated_gradients" else None,
        forward_passes=request.cost(input_size),
    )
