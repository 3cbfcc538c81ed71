"""GET endpoints for looking inside the model: the manifest with its layer
table, the learned kernels as a picture, the channel atlas, and the
feature-map inspector page (static files under service/http/ui, served at /ui).

A small Starlette app mounted on the service (BentoML APIs are POST-only);
its handlers reach the worker's service through the `Running` handle it is built with
(service.core.running); before the service has started they answer 503 not_ready.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from model.card import model_card
from model.checkpoint import CheckpointError
from model.visualize import encode_png, kernel_grid
from service.control.moves import request_move
from service.control.rollout import RolloutDir
from service.core.refusals import Refusal
from service.core.running import Running
from service.http.rollouts import rollout_state, start_rollout, stop_rollout
from service.http.samples import sample_image, sample_names

UI_DIR = Path(__file__).parent / "ui"


def admission_state(admission) -> dict:
    """Admission control's state in this worker (service.runtime.admission): work in single-image forward-pass
    equivalents (decoding included), the cap on it, what is in each lane of the model (images in the
    batcher's, requests in the attributions') and its bound, the time answers took, the line at the door."""
    return {"inflight_requests": admission.requests, "inflight_units": round(admission.inflight, 2),
            "cap_units": round(admission.cap, 1), "target_seconds": admission.budget_seconds,
            "lanes": {lane: {"in_flight": round(admission.in_lane[lane], 1), "bound": bound}
                      for lane, bound in admission.lanes.items()},
            "recent_answer_seconds": round(admission.recent_seconds, 3),
            "waiting": admission.waiting(), "wait_seconds": admission.wait_seconds,
            "decode_units_per_mb": round(admission.units(0, 1_000_000), 2),
            "door_units_per_mb": admission.door_rates(),
            "door_images_per_mb": admission.door_shares(),
            "work_units_per_pass": {kind: round(f, 2) for kind, f in admission.work_factors.items()}}


async def describe_model(service) -> dict:
    """The served model: preset, classes, preprocessing, training metrics, checkpoint sha256,
    device and precision, the process layout, batching settings, limits and the layer table."""
    pipeline = service.pipeline
    version = pipeline.version
    manifest = version.manifest.to_dict()
    training = dict(manifest.get("training", {}))
    training.pop("history", None)  # long; the report command plots it
    config = service.config
    served = await pipeline.backend.describe()
    return {
        "tag": version.tag,
        "card": {**model_card(version.manifest, version.tag),
                 "atlas": version.atlas.available, "samples": sample_names(_dataset(version)),
                 "low_confidence_below": config.low_confidence_below},
        "preset": version.manifest.preset,
        "classes": version.manifest.class_names,
        "preprocessing": manifest["preprocessing"],
        "model_config": manifest["model_config"],
        "training": training,
        "weights_sha256": version.manifest.weights_sha256,
        "device": served["device"],
        "dtype": served["dtype"],
        "precision": served["precision"],
        "layout": service.layout.describe(),
        "batching": {"max_batch_size": config.max_batch_size, "max_latency_ms": config.max_latency_ms,
                     "batcher": "bentoml (model service)" if service.layout.split else "in-process",
                     "admission": admission_state(pipeline.admission)},
        "limits": {
            "max_images_per_request": config.max_images_per_request,
            "max_body_bytes": config.max_body_bytes,
            "max_image_pixels": config.max_image_pixels,
            "max_feature_map_bytes": config.max_feature_map_bytes,
        },
        "layers": [row.to_dict() for row in version.layers.values()],
        # what every worker serves, from the moves' control directory (service.control.control_dir)
        "workers": [status.to_dict() for status in service.versions.control.statuses()],
    }


def _service(request: Request):
    """The worker's service; 503 not_ready before it has started."""
    service = request.app.state.running.service
    if service is None:
        raise Refusal(503, "not_ready", "the model is still loading")
    return service


async def model_info(request: Request) -> Response:
    try:
        service = _service(request)
    except Refusal as refusal:
        return refusal.response()
    return JSONResponse(await describe_model(service))


def _dataset(version) -> str:
    return str(version.manifest.training.get("dataset", "unknown"))


async def samples(request: Request) -> Response:
    """The sample images that fit the served model: their names and where to get them."""
    try:
        version = _service(request).pipeline.version
    except Exception as err:
        return _refused(err, request)
    names = sample_names(_dataset(version))
    return JSONResponse({"dataset": _dataset(version),
                         "samples": [{"name": name, "url": f"/samples/{name}"} for name in names]})


async def sample(request: Request) -> Response:
    """One sample image (PNG or JPEG)."""
    name = request.path_params["name"]
    try:
        dataset = _dataset(_service(request).pipeline.version)
        data, media_type = await anyio.to_thread.run_sync(sample_image, dataset, name)
    except KeyError:
        return Refusal(404, "no_such_sample", f"no sample {name[:40]!r} for this model: see GET /samples").response()
    except Exception as err:
        return _refused(err, request)
    return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


async def kernels(request: Request) -> Response:
    """The learned kernels of a conv layer as a PNG grid (?layer=conv1).
    conv1 kernels are shown in colour; deeper layers as their mean over input channels."""
    layer = request.query_params.get("layer", "conv1")
    try:
        weight = torch.from_numpy(await _service(request).pipeline.backend.kernels(layer))
    except Exception as err:
        return _refused(err, request)
    png = await anyio.to_thread.run_sync(lambda: encode_png(kernel_grid(weight)))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


async def atlas(request: Request) -> Response:
    """The channel atlas: ?layer=conv5 (every channel, summarized) or ?layer=conv5&channel=12 (its patches)."""
    layer = request.query_params.get("layer", "conv1")
    channel = request.query_params.get("channel")
    try:
        atlas = _service(request).pipeline.version.atlas
        if channel is None:
            body = atlas.summary(layer)
        elif not channel.lstrip("-").isdigit():
            raise Refusal(400, "invalid_channel", f"channel must be an integer, not {channel[:40]!r}")
        else:
            body = await anyio.to_thread.run_sync(atlas.channel, layer, int(channel))
    except CheckpointError as err:  # tampered or missing since the service started
        return Refusal(500, "atlas_unreadable", str(err)).response()
    except Exception as err:
        return _refused(err, request)
    return JSONResponse(body)


def _refused(err: Exception, request: Request) -> Response:
    """A refusal's answer, as the POST endpoints give it (the pipeline's, uncounted: these are no inference
    endpoints); anything else is a fault."""
    return request.app.state.running.refusal_response(None, err)


async def move_model(request: Request) -> Response:
    """POST {"tag": "cnn-classifier:<version>"}: move every worker to that version (service.control.moves),
    answering when all serve it, or saying which did not and why (then all are back on the old one).
    409 move_in_progress while another move runs: moves are not queued."""
    try:
        service = _service(request)
    except Refusal as refusal:
        return refusal.response()
    try:
        tag = (await request.json())["tag"]
        if not isinstance(tag, str) or not tag:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return Refusal(400, "invalid_request", 'send {"tag": "<model name>:<version>"}').response()
    expected = service.layout.api_workers + service.layout.model_workers
    rollout = RolloutDir(service.versions.control).plan()
    if rollout is not None and rollout.live:  # its promotion or rollback would undo this move
        return Refusal(409, "rollout_in_progress", f"a rollout of {rollout.candidate} is {rollout.state}: let it "
                       "end, or stop it (DELETE /admin/rollout), then move").response()
    try:  # one move at a time across the workers; the version checked (not built) before any moves
        result = await anyio.to_thread.run_sync(
            lambda: request_move(service.versions.control, tag, lambda: service.pipeline.backend.current, expected,
                                 float(service.config.request_timeout_s * 4),
                                 on_refused=service.pipeline.metrics.model_swaps.labels("refused").inc))
    except Refusal as refusal:
        return refusal.response()
    if not result.moved:
        return JSONResponse({"error": result.reason, "detail": result.detail, **result.to_dict()}, status_code=409)
    return JSONResponse(result.to_dict())


async def ui_root(request: Request) -> Response:
    return RedirectResponse("/ui/")


ROUTES = [
    Route("/model", model_info, methods=["GET"]),
    Route("/kernels", kernels, methods=["GET"]),
    Route("/atlas", atlas, methods=["GET"]),
    Route("/samples", samples, methods=["GET"]),
    Route("/samples/{name}", sample, methods=["GET"]),
    Route("/admin/model", move_model, methods=["POST"]),
    Route("/admin/rollout", start_rollout, methods=["POST"]),
    Route("/admin/rollout", rollout_state, methods=["GET"]),
    Route("/admin/rollout", stop_rollout, methods=["DELETE"]),
    Route("/ui", ui_root, methods=["GET"]),
    Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"),
]


def introspection_app(running: Running) -> Starlette:
    """The routes, as an app for BentoML to mount; they reach the worker's service through `running`."""
    app = Starlette(routes=ROUTES)
    app.state.running = running
    return app
