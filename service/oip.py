"""The Open Inference Protocol (KServe v2 REST), with Triton's binary tensor data and
classification extensions: what tritonclient and KServe's clients speak.

A Starlette app mounted on the service (BentoML's APIs are POST-only with fixed routes;
these routes are GETs and carry the model's name in the path). It is mounted at "/" with
full paths, because GET /v2 itself must answer and a mount at "/v2" only reaches /v2/...;
BentoML's mounts only match the routes their app declares, so it shadows nothing. Starlette
rather than FastAPI: the body is JSON followed by binary tensors, read by hand either way,
and no new dependency.

Each request goes the way the other endpoints' do, through the same pieces of the running
service (bentoml.get_current_service()): the guards (API key, body limit, shedding with 503 +
Retry-After; service.endpoints declares these routes), admission, the decoder (BYTES), the
backend's batcher (probabilities, embeddings) and activations (feature maps), the metrics
(endpoint label "v2_infer"), and model/'s typed errors mapped to 4xx once (service.errors).
Errors are the protocol's {"error": "<reason>: <detail>"}.

Inputs (exactly one): `images` BYTES [N] (encoded images, as /classify takes them), or
`pixels` UINT8 [N, S, S, 3] (resized and cropped by the client: model.client_preprocess).
Outputs, by name: `probabilities` FP32 [N, classes] (with Triton's `classification`
parameter: BYTES [N, k] "score:index:label"), `top_k_labels` BYTES, `top_k_scores` FP32,
`top_k_indices` INT64 (each [N, k]), `embedding` FP32 [N, D], and any layer by its name
(conv1 ... fc8): FP32 [N, C, H, W] or [N, D], or the channels asked for.
"""

from __future__ import annotations

import time
from importlib import metadata

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model.network import STAGES
from model.store import DEFAULT_TAG
from service import oip_codec as codec
from service.errors import Refusal, refusal_for

ENDPOINT = "v2_infer"  # the endpoint label of the metrics
EXTENSIONS = ["binary_tensor_data", "classification"]
PREDICTED = ("probabilities", "top_k_labels", "top_k_scores", "top_k_indices", "embedding")
DEFAULT_OUTPUTS = PREDICTED  # when a request names none (every output but the feature maps)
DEFAULT_TOP_K = 5
INPUTS = {"images": "BYTES", "pixels": "UINT8"}


def model_identity(version) -> tuple[str, str]:
    """(name, version) of the served model: its store tag's. A checkpoint directory (CHECKPOINT_DIR, as
    the container serves one) goes by the store's name, and the start of its weights' sha256, so
    clients call the same name however the model is served."""
    kind, _, rest = version.tag.partition(":")
    if kind == "dir":
        return DEFAULT_TAG.split(":")[0], version.manifest.weights_sha256[:12]
    return kind, rest


def _server_version() -> str:
    try:
        return metadata.version("cnn-serving")
    except metadata.PackageNotFoundError:
        return "unknown"


def oip_error(refusal: Refusal) -> Response:
    return refusal.oip_response()


def _served(request: Request):
    """The running service and the model version this request uses (pinned: one version from checks to
    answer), after checking the path's model name and version against it."""
    service = bentoml.get_current_service()
    version = service.backend.pin()
    name, served_version = model_identity(version)
    asked, asked_version = request.path_params["name"], request.path_params.get("version")
    if asked != name:
        raise Refusal(404, "unknown_model", f"no model {asked!r}; this server serves {name!r}")
    if asked_version not in (None, "", served_version):
        raise Refusal(404, "unknown_version", f"model {name!r} serves version {served_version!r}, "
                                              f"not {asked_version!r}")
    return service, version


async def _answer(request: Request, work) -> Response:
    try:
        return await work()
    except Exception as err:
        service = bentoml.get_current_service()
        refusal = refusal_for(err, service.config.retry_after_s)
        if refusal is None:
            raise
        if request.method == "POST":
            service.metrics.refusals.labels(ENDPOINT, refusal.reason).inc()
        return oip_error(refusal)


# ----- metadata and health ---------------------------------------------------------------------


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "cnn-serving", "version": _server_version(), "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    service = bentoml.get_current_service()
    if service is None or not getattr(service, "ready", False):
        return oip_error(Refusal(503, "not_ready", "the model is still loading"))
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


def _param(output: codec.RequestedOutput | None, request: codec.InferRequest, key: str, default):
    """A parameter of the output, else of the request, else the default."""
    if output is not None and key in output.parameters:
        return output.parameters[key]
    return request.parameters.get(key, default)


def _int_param(value, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refusal(400, "invalid_parameter", f"parameter {key!r} must be an integer in {low}..{high}")
    return value


def _channels(value, layer: str) -> list[int] | None:
    """A layer's `channels` parameter: a list of indices, or a string "0,3,7" (protocol parameters are
    scalars, so tritonclient users send `<layer>.channels` as a string at the request level)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            value = None
    if not isinstance(value, list) or not value or not all(isinstance(c, int) and not isinstance(c, bool)
                                                           for c in value):
        raise Refusal(400, "invalid_parameter", f"channels of {layer!r} must be a list of channel indices "
                                                "or a string like \"0,3,7\"")
    return list(dict.fromkeys(value))


class Plan:
    """The outputs a request asked for, every parameter checked against the model before any work."""

    def __init__(self, request: codec.InferRequest, version, max_bytes: int, images: int):
        asked = request.outputs or [codec.RequestedOutput(name) for name in DEFAULT_OUTPUTS]
        binary_default = request.parameters.get("binary_data_output", False) is True
        layers = version.network.named_layers
        self.outputs = []  # (requested, binary, extra: dict)
        self.stage = _param(None, request, "stage", "post_relu")
        self.layers: dict[str, list[int] | None] = {}
        feature_bytes = 0
        for out in asked:
            binary = out.parameters.get("binary_data", binary_default) is True
            extra = {}
            if out.name in PREDICTED:
                if out.name.startswith("top_k"):
                    extra["k"] = _int_param(_param(out, request, "top_k", DEFAULT_TOP_K), "top_k", 1, 1000)
                if out.name == "embedding":
                    extra["normalize"] = _param(out, request, "normalize", True) is not False
                if "classification" in out.parameters:
                    if out.name != "probabilities":
                        raise Refusal(400, "invalid_parameter", "`classification` applies to `probabilities` only")
                    extra["classification"] = _int_param(out.parameters["classification"], "classification", 1, 1000)
            elif out.name in layers:
                stage = _param(out, request, "stage", self.stage)
                if stage != self.stage or stage not in STAGES:
                    raise Refusal(400, "invalid_parameter", f"stage must be one of {list(STAGES)}, the same for "
                                                            "every layer of a request")
                channels = _channels(out.parameters.get("channels", request.parameters.get(f"{out.name}.channels")),
                                     out.name)
                info = version.layers[out.name]
                if channels is not None:
                    info.check_channels(channels)  # model/'s typed refusal: 422
                per_channel = int(np.prod(info.output_shape[1:], dtype=np.int64))
                feature_bytes += images * len(channels or range(info.channels)) * per_channel * 4
                self.layers[out.name] = channels
            else:
                raise Refusal(400, "unknown_output", f"no output {out.name!r}; outputs: {list(PREDICTED)} and the "
                                                     f"layers {list(layers)}")
            self.outputs.append((out, binary, extra))
        if feature_bytes > max_bytes:
            raise Refusal(422, "response_too_large", f"the feature maps asked for are {feature_bytes:,} bytes; the "
                                                     f"cap is {max_bytes:,}: ask for fewer layers, channels or images")
        self.predicts = any(out.name in PREDICTED for out, _, _ in self.outputs)

    @property
    def forward_passes(self) -> int:
        """Per image, what admission charges: one batched pass for the predictions, one for the maps."""
        return int(self.predicts) + int(bool(self.layers))


def _images_input(request: codec.InferRequest, service, size: int) -> tuple[codec.InputTensor, int]:
    if len(request.inputs) != 1:
        raise Refusal(400, "one_input", f"send exactly one input, `images` (BYTES) or `pixels` (UINT8); got "
                                        f"{[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    expected = INPUTS.get(tensor.name)
    if expected is None:
        raise Refusal(400, "unknown_input", f"no input {tensor.name!r}; inputs: images (BYTES [N]), "
                                            f"pixels (UINT8 [N, {size}, {size}, 3])")
    if tensor.datatype != expected:
        raise Refusal(400, "datatype_mismatch", f"input {tensor.name!r} is {expected}, not {tensor.datatype}")
    if tensor.name == "pixels" and (len(tensor.shape) != 4 or tensor.shape[1:] != [size, size, 3]):
        raise Refusal(400, "shape_mismatch", f"input 'pixels' is UINT8 [N, {size}, {size}, 3] (RGB, channels-last, "
                                             f"resized and center-cropped: model.client_preprocess); got {tensor.shape}")
    if tensor.name == "images" and (len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ([], [1])):
        raise Refusal(400, "shape_mismatch", f"input 'images' is BYTES [N] (or [N, 1]); got {tensor.shape}")
    count = tensor.shape[0]
    if count == 0:
        raise Refusal(400, "no_image", "the input holds no image (N = 0)")
    limit = service.config.max_images_per_request
    if count > limit:
        raise Refusal(413, "too_many_images", f"{count} images in one request; the limit is {limit}")
    return tensor, count


async def infer(request: Request) -> Response:
    async def work():
        service, version = _served(request)
        parsed = codec.parse_request(await request.body(), request.headers.get("inference-header-content-length"))
        size = version.manifest.preprocessing.input_size
        tensor, count = _images_input(parsed, service, size)
        plan = Plan(parsed, version, service.config.max_feature_map_bytes, count)
        async with service._admitted(count * plan.forward_passes):
            if tensor.name == "pixels":
                pixels = tensor.uint8()  # as the client cropped them: no decoding, no resizing
            else:
                pixels = await service._decode(ENDPOINT, tensor.bytes_elements())
            predicted = await service.backend.predict(pixels) if plan.predicts else None
            maps = await _feature_maps(service, pixels, plan) if plan.layers else {}
        service.metrics.images.labels(ENDPOINT).inc(count)
        if predicted is not None:
            _observe_predictions(service, predicted)
        answered_by = predicted.version if predicted is not None else version
        name, served_version = model_identity(answered_by)
        header = {"model_name": name, "model_version": served_version}
        if parsed.id is not None:
            header["id"] = parsed.id
        outputs = [_output(out, binary, extra, predicted, maps) for out, binary, extra in plan.outputs]
        body, json_length = codec.encode_response(header, outputs)
        if json_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_length)})

    return await _answer(request, work)


async def _feature_maps(service, pixels: np.ndarray, plan: Plan) -> dict[str, np.ndarray]:
    """Each layer's maps for the batch, [N, C, H, W] (or [N, D]), the asked channels only."""
    names = list(plan.layers)
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    start = time.perf_counter()
    for image in pixels:
        activations, _ = await service.backend.activations(np.ascontiguousarray(image), names, plan.stage)
        for name in names:
            channels = plan.layers[name]
            found[name].append(activations[name] if channels is None else activations[name][channels])
    service.metrics.forward_seconds.labels(ENDPOINT, service.metrics.device).observe(time.perf_counter() - start)
    return {name: np.stack(values) for name, values in found.items()}


def _output(out: codec.RequestedOutput, binary: bool, extra: dict, predicted, maps: dict) -> codec.OutputTensor:
    if out.name in maps:
        values = maps[out.name]
        return codec.OutputTensor(out.name, "FP32", values, list(values.shape), binary)
    probabilities = predicted.probabilities
    names = predicted.version.manifest.class_names
    count = len(probabilities)
    if out.name == "embedding":
        values = predicted.embeddings
        if extra["normalize"]:
            values = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
        return codec.OutputTensor(out.name, "FP32", values, list(values.shape), binary)
    k = min(extra.get("k") or extra.get("classification") or 1, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probabilities, order, axis=1)
    if out.name == "probabilities":
        if "classification" not in extra:
            return codec.OutputTensor(out.name, "FP32", probabilities, list(probabilities.shape), binary)
        rows = [[f"{p:f}:{i}:{names[i]}" for i, p in zip(row.tolist(), values.tolist())]
                for row, values in zip(order, scores)]
        return codec.OutputTensor(out.name, "BYTES", rows, [count, k], binary)
    if out.name == "top_k_labels":
        return codec.OutputTensor(out.name, "BYTES", [[names[i] for i in row] for row in order.tolist()],
                                  [count, k], binary)
    if out.name == "top_k_scores":
        return codec.OutputTensor(out.name, "FP32", scores, [count, k], binary)
    return codec.OutputTensor(out.name, "INT64", order, [count, k], binary)


def _observe_predictions(service, predicted) -> None:
    """The drift signals /classify feeds (top-1 class and its probability), once per image."""
    names = predicted.version.manifest.class_names
    probabilities = predicted.probabilities
    top = probabilities.argmax(axis=1)
    for index, score in zip(top.tolist(), probabilities[np.arange(len(top)), top].tolist()):
        service.metrics.predictions.labels(names[index]).inc()
        service.metrics.confidence.observe(score)


async def no_route(request: Request) -> Response:
    return oip_error(Refusal(404, "no_route", f"no route {request.method} {request.url.path}; the protocol's: "
                                              "GET /v2, /v2/health/{live,ready}, /v2/models/<name>[/versions/<v>]"
                                              "[/ready], POST /v2/models/<name>[/versions/<v>]/infer"))


_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"
oip_app = Starlette(routes=[
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    *(Route(base, model_metadata, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(f"{base}/ready", model_ready, methods=["GET"]) for base in (_MODEL, _VERSION)),
    *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (_MODEL, _VERSION)),
    Route("/v2/{rest:path}", no_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
])
