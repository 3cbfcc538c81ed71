"""/explain and /gradcam (its Grad-CAM in an older shape): where in one image the evidence for a class
lies, shaped for the response."""

from __future__ import annotations

import base64

import anyio
import numpy as np
import torch

from model.visualize import encode_png, heatmap_rgba
from service.runtime.feature_maps import float16_payload
from model.attribution import AttributionRequest
from service.core.schemas import ExplainResponse, GradCamResponse


async def gradcam(pipeline, image: np.ndarray, request: AttributionRequest) -> GradCamResponse:
    """/gradcam: /explain's Grad-CAM (same request, same backend call), in the response /gradcam
    has always had: the map at the layer's resolution, and the heat map as a PNG.
    `pipeline`: the worker's (service.runtime.pipeline: its backend and input size)."""
    found = await pipeline.backend.explain(image, request)
    class_names, input_size = found.version.manifest.class_names, pipeline.input_size
    heatmap = torch.from_numpy(found.input_map)  # the layer map upsampled to the input, in [0, 1]
    png = await anyio.to_thread.run_sync(lambda: encode_png(heatmap_rgba(heatmap)))
    row = found.version.layers[request.layer]
    return GradCamResponse(
        model=found.version.tag, layer=request.layer, class_index=found.class_index, label=class_names[found.class_index],
        probability=found.probability, input_size=input_size, layer_map=float16_payload(torch.from_numpy(found.layer_map)),
        receptive_field=row.receptive_field, jump=row.jump, heatmap_png=base64.b64encode(png).decode(),
    )


async def explain(pipeline, image: np.ndarray, request: AttributionRequest) -> ExplainResponse:
    """/explain for one decoded image, `request` resolved."""
    found = await pipeline.backend.explain(image, request)
    class_names, input_size = found.version.manifest.class_names, pipeline.input_size
    attribution = torch.from_numpy(found.input_map)
    evidence = attribution.clamp(min=0)
    heat = evidence / evidence.max().clamp(min=1e-12)
    png = await anyio.to_thread.run_sync(lambda: encode_png(heatmap_rgba(heat)))
    return ExplainResponse(
        model=found.version.tag, method=request.method, class_index=found.class_index, label=class_names[found.class_index],
        probability=found.probability, input_size=input_size, signed=found.signed,
        attribution=float16_payload(attribution), overlay_png=base64.b64encode(png).decode(),
        layer=request.layer, window=request.window, stride=request.stride,
        steps=request.steps if request.method == "integrated_gradients" else None,
        forward_passes=request.cost(input_size),
    )
