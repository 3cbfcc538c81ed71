"""GET endpoints for looking inside the model: the manifest with its layer
table, the learned kernels as a picture, and the feature-map inspector page
(static files under service/ui, served at /ui).

A small Starlette app mounted on the service (BentoML APIs are POST-only);
its handlers reach the running service through bentoml.get_current_service().
"""

from __future__ import annotations

from pathlib import Path

import anyio
import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"

from model.visualize import encode_png, kernel_grid


def _error(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


async def model_info(request: Request) -> Response:
    """The served model: preset, classes, preprocessing, training metrics,
    checkpoint sha256, device, dtype, batching settings and the layer table."""
    service = bentoml.get_current_service()
    return JSONResponse(service.model_description())


async def kernels(request: Request) -> Response:
    """The learned kernels of a conv layer as a PNG grid (?layer=conv1).
    conv1 kernels are shown in colour; deeper layers as their mean over input channels."""
    service = bentoml.get_current_service()
    layer = request.query_params.get("layer", "conv1")
    convs = [name for name, row in service.layers.items() if row.type == "conv"]
    if layer not in convs:
        return _error(422, "unknown_layer", f"no conv layer {layer!r}; valid: {convs}")
    weight = service.predictor.model.get_submodule(layer).weight
    png = await anyio.to_thread.run_sync(lambda: encode_png(kernel_grid(weight)))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


async def ui_root(request: Request) -> Response:
    return RedirectResponse("/ui/")


introspection_app = Starlette(routes=[
    Route("/model", model_info, methods=["GET"]),
    Route("/kernels", kernels, methods=["GET"]),
    Route("/ui", ui_root, methods=["GET"]),
    Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"),
])
