"""The Open Inference Protocol (KServe v2 REST), with Triton's binary tensor data and
classification extensions: what tritonclient and KServe's clients speak.

A Starlette app mounted on the service (BentoML's APIs are POST-only with fixed routes;
these routes are GETs and carry the model's name in the path). It is mounted at "/" with
full paths, because GET /v2 itself must answer and a mount at "/v2" only reaches /v2/...;
BentoML's mounts only match the routes their app declares, so it shadows nothing. Starlette
rather than FastAPI: the body is JSON followed by binary tensors, read by hand either way,
and no new dependency.

Each request goes the way the other endpoints' do, through the worker's request pipeline
(service.runtime.pipeline, reached through the `Running` handle the app is built with): the
guards (API key, body limit, shedding with 503 + Retry-After; service.core.endpoints declares
these routes), admission, the decoder (BYTES), the backend's batcher (probabilities, embeddings)
and activations (feature maps), the metrics (endpoint label "v2_infer"), and refusals -- model/'s
typed errors included -- answered once (Pipeline.refusal_response).
Errors are the protocol's {"error": "<reason>: <detail>"}. The routes and the model's metadata
are here; what an inference request asks and how its outputs are built, in service.oip.infer;
the wire format, in service.oip.codec.

Inputs (exactly one): `images` BYTES [N] (encoded images, as /classify takes them), or
`pixels` UINT8 [N, S, S, 3] (resized and cropped by the client: model.client_preprocess).
Outputs, by name: `probabilities` FP32 [N, classes] (with Triton's `classification`
parameter: BYTES [N, k] "score:index:label"), `top_k_labels` BYTES, `top_k_scores` FP32,
`top_k_indices` INT64 (each [N, k]), `embedding` FP32 [N, D], and any layer by its name
(conv1 ... fc8): FP32 [N, C, H, W] or [N, D], or the channels asked for.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model.store import DEFAULT_TAG
from service.core.package import package_version
from service.core.refusals import Refusal
from service.core.running import Running
from service.oip import codec
from service.oip import infer as oip_infer
from service.oip.infer import ENDPOINT

EXTENSIONS = ["binary_tensor_data", "classification"]


def model_identity(version) -> tuple[str, str]:
    """(name, version) of the served model: its store tag's. A checkpoint directory (CHECKPOINT_DIR, as
    the container serves one) goes by the store's name, and the start of its weights' sha256, so
    clients call the same name however the model is served."""
    kind, _, rest = version.tag.partition(":")
    if kind == "dir":
        return DEFAULT_TAG.split(":")[0], version.manifest.weights_sha256[:12]
    return kind, rest


def _pipeline(request: Request):
    """The worker's request pipeline; 503 not_ready before the service has started."""
    pipeline = request.app.state.running.pipeline
    if pipeline is None:
        raise Refusal(503, "not_ready", "the model is still loading")
    return pipeline


def _served(request: Request):
    """The worker's pipeline and the model version this request uses (pinned: one version from checks
    to answer), after checking the path's model name and version against it."""
    pipeline = _pipeline(request)
    version = pipeline.pin()
    name, served_version = model_identity(version)
    asked, asked_version = request.path_params["name"], request.path_params.get("version")
    if asked != name:
        raise Refusal(404, "unknown_model", f"no model {asked!r}; this server serves {name!r}")
    if asked_version not in (None, "", served_version):
        raise Refusal(404, "unknown_version", f"model {name!r} serves version {served_version!r}, "
                                              f"not {asked_version!r}")
    return pipeline, version


async def _answer(request: Request, work) -> Response:
    """`work()`'s response, or its refusal in the protocol's error body (inference refusals counted)."""
    try:
        return await work()
    except Exception as err:
        endpoint = ENDPOINT if request.method == "POST" else None
        return request.app.state.running.refusal_response(endpoint, err, oip=True)


# ----- metadata and health ---------------------------------------------------------------------


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "cnn-serving", "version": package_version(), "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    service = request.app.state.running.service
    if service is None or not service.ready:
        return Refusal(503, "not_ready", "the model is still loading").oip_response()
    return JSONResponse({"ready": True})


async def model_ready(request: Request) -> Response:
    async def work():
        _, version = _served(request)
        return JSONResponse({"name": model_identity(version)[0], "ready": True})

    return await _answer(request, work)


async def model_metadata(request: Request) -> Response:
    async def work():
        _, version = _served(request)
        return JSONResponse(describe(version))

    return await _answer(request, work)


def describe(version) -> dict:
    """The model metadata: inputs and outputs with datatype and shape (-1: any size), and under
    `parameters` (an addition to the protocol's fields) the preprocessing a `pixels` client applies."""
    name, served_version = model_identity(version)
    prep = version.manifest.preprocessing
    size = prep.input_size
    layers = [{"name": layer, "datatype": "FP32", "shape": [-1, *version.layers[layer].output_shape]}
              for layer in version.network.named_layers]
    classes = version.manifest.model_config.num_classes
    dim = version.layers[version.network.embedding_layer].output_shape[0]
    return {
        "name": name, "versions": [served_version], "platform": "pytorch",
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "top_k_labels", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "top_k_scores", "datatype": "FP32", "shape": [-1, -1]},
                    {"name": "top_k_indices", "datatype": "INT64", "shape": [-1, -1]},
                    {"name": "embedding", "datatype": "FP32", "shape": [-1, dim]},
                    *layers],
        "parameters": {"tag": version.tag, "input_size": size, "resize_size": prep.resize_size,
                       "pixels": "uint8 RGB, channels-last: resized so the shorter side is resize_size, "
                                 "center-cropped to input_size (model.client_preprocess)",
                       "classes": list(version.manifest.class_names)},
    }


# ----- inference ---------------------------------------------------------------------------------


async def infer(request: Request) -> Response:
    async def work():
        pipeline, version = _served(request)
        parsed = codec.parse_request(await request.body(), request.headers.get("inference-header-content-length"))
        size = version.manifest.preprocessing.input_size
        tensor, count = oip_infer.images_input(parsed, pipeline.config.max_images_per_request, size)
        plan = oip_infer.Plan(parsed, version, pipeline.config.max_feature_map_bytes, count)
        encoded = 0 if tensor.name == "pixels" else sum(len(item) for item in tensor.bytes_elements())
        async with pipeline.admitted(ENDPOINT, count * plan.forward_passes, encoded,
                                     share=count if plan.predicts else 0):
            if tensor.name == "pixels":
                pixels = tensor.uint8()  # as the client cropped them: no decoding, no resizing
            else:
                with pipeline.expecting(count if plan.predicts else 0):
                    pixels = await pipeline.decode(ENDPOINT, tensor.bytes_elements())
            predicted = await pipeline.forward(pixels) if plan.predicts else None
            maps = await oip_infer.feature_maps(pipeline, pixels, plan) if plan.layers else {}
        if predicted is not None:
            pipeline.observe_predictions(ENDPOINT, predicted)
        else:
            pipeline.metrics.images.labels(ENDPOINT).inc(count)
        answered_by = predicted.version if predicted is not None else version
        name, served_version = model_identity(answered_by)
        header = {"model_name": name, "model_version": served_version}
        if parsed.id is not None:
            header["id"] = parsed.id
        outputs = [oip_infer.output(out, binary, extra, predicted, maps) for out, binary, extra in plan.outputs]
        body, json_length = codec.encode_response(header, outputs)
        if json_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    return await _answer(request, work)


async def no_route(request: Request) -> Response:
    return (Refusal(404, "no_route", f"no route {request.method} {request.url.path}; the protocol's: "
                                              "GET /v2, /v2/health/{live,ready}, /v2/models/<name>[/versions/<v>]"
                                              "[/ready], POST /v2/models/<name>[/versions/<v>]/infer").oip_response())


_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"
ROUTES = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    *(Route(base, model_metadata, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(f"{base}/ready", model_ready, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (_MODEL, _VERSION)),
    Route("/v2/{rest:path}", no_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
]


def oip_app(running: Running) -> Starlette:
    """The protocol's routes, as an app for BentoML to mount; they reach the worker's pipeline through
    `running` (service.core.running)."""
    app = Starlette(routes=ROUTES)
    app.state.running = running
    return app
