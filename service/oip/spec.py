"""The Open Inference Protocol's routes (service.oip.app) in the OpenAPI spec.

They are a mounted Starlette app, which BentoML does not put in /docs.json; service.http.rewrites
merges these paths and schemas in (amend_docs), as it does the introspection routes. The
schemas are the protocol's (kserve/open-inference-protocol, inference_rest.md) with what this
server adds: Triton's binary tensor data (an application/octet-stream body: the JSON, then the
tensors, with the JSON's length in Inference-Header-Content-Length) and its parameters. Errors
are the protocol's {"error": "<reason>: <detail>"}, not the rest of the service's
{"error", "detail"}.
"""

from __future__ import annotations

import copy

from service.oip.codec import DATATYPES

TAG = "Open Inference Protocol (KServe v2)"
TAG_DESCRIPTION = ("The [Open Inference Protocol](https://github.com/kserve/open-inference-protocol) (KServe v2 REST), "
                   "with Triton's binary tensor data and classification extensions: what tritonclient and KServe's "
                   "clients call. Errors are the protocol's `{\"error\": \"<reason>: <detail>\"}`.")

HEADER_LENGTH = "Inference-Header-Content-Length"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


# A 1x1 PNG (one red pixel), in base64: a BYTES element as the protocol's JSON carries it.
EXAMPLE_IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"

_PARAMETERS = {
    "type": "object",
    "additionalProperties": {},
    "description": "Key/value parameters (the protocol's are booleans, numbers or strings). This server reads, on "
                   "the request or on one output: `top_k` (integer 1..1000, default 5), `normalize` (boolean, the "
                   "embedding), `stage` (`post_relu` or `pre_relu`), `channels` (on a layer output: a list of "
                   "channel indices or a string `\"0,3,7\"`; on the request: `\"<layer>.channels\"`), "
                   "`classification` (on `probabilities`: integer k), `binary_data` (on an output) and "
                   "`binary_data_output` (on the request); on an input, `binary_data_size`.",
}
_TENSOR_DATA = {
    "type": "array",
    "items": {"anyOf": [{"type": "boolean"}, {"type": "number"}, {"type": "string"},
                        {"type": "array", "items": {}}]},
    "description": "The tensor's elements, row-major, as a flat or nested list. BYTES elements are strings: here, "
                   "each an encoded image in base64.",
}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_METADATA_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                   "shape": {"type": "array", "items": {"type": "integer"},
                             "description": "-1: a dimension of any size"}},
}

SCHEMAS = {
    "OipError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "`<reason>: <detail>`, a stable reason code "
                                                                  "first"}},
        "additionalProperties": False,
        "description": "The Open Inference Protocol's error body.",
    },
    "OipParameters": _PARAMETERS,
    "OipTensorMetadata": _METADATA_TENSOR,
    "OipRequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "description": "`images` (BYTES [N]) or `pixels` (UINT8 [N, S, S, 3])"},
            "shape": _SHAPE,
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": _ref("OipParameters"),
            "data": _ref("OipTensorData"),
        },
        "description": "An input tensor: its elements in `data`, or as binary tensor data after the JSON, "
                       "`parameters.binary_data_size` bytes.",
    },
    "OipTensorData": _TENSOR_DATA,
    "OipRequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _ref("OipParameters")},
    },
    "OipInferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "returned in the response"},
            "parameters": _ref("OipParameters"),
            "inputs": {"type": "array", "minItems": 1, "items": _ref("OipRequestInput"),
                       "description": "the input tensors; this model takes exactly one, `images` or `pixels`"},
            "outputs": {"type": "array", "items": _ref("OipRequestOutput"),
                        "description": "the outputs wanted; none: probabilities, top_k_labels, top_k_scores, "
                                       "top_k_indices and embedding"},
        },
    },
    "OipResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"}, "shape": _SHAPE, "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": _ref("OipParameters"), "data": _ref("OipTensorData"),
        },
        "description": "An output tensor: its elements in `data`, or as binary tensor data after the JSON, "
                       "`parameters.binary_data_size` bytes.",
    },
    "OipInferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"},
            "id": {"type": "string", "description": "the request's `id`, when it had one"},
            "parameters": _ref("OipParameters"),
            "outputs": {"type": "array", "items": _ref("OipResponseOutput")},
        },
    },
    "OipServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "OipModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("OipTensorMetadata")},
            "outputs": {"type": "array", "items": _ref("OipTensorMetadata")},
            "parameters": {"type": "object", "description": "this server's addition: the tag, the preprocessing "
                                                            "a `pixels` client applies, the class names"},
        },
    },
    "OipServerLive": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "OipServerReady": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "OipModelReady": {"type": "object", "required": ["name", "ready"],
                      "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
}


def _json(schema: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _error(description: str, headers: dict | None = None) -> dict:
    response = _json("OipError", description)
    if headers:
        response["headers"] = headers
    return response


UNAUTHORIZED = _error("API key missing or wrong (only when API_KEY is set)",
                      {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}})
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"}}
_SEGMENT = {"type": "string", "pattern": "^[^/]+$"}  # one path segment
UNKNOWN_MODEL = _error("no such model, or it does not serve that version")


def _path_parameters(name: str, version: str | None, versioned: bool) -> list[dict]:
    parameters = [{"name": "model_name", "in": "path", "required": True, "example": name,
                   "schema": _SEGMENT,
                   "description": f"the served model's name (`{name}`); another answers 404"}]
    if versioned:
        parameters.append({"name": "model_version", "in": "path", "required": True,
                           "schema": _SEGMENT,
                           "description": "the served model's version (its `versions` in the metadata); "
                                          "another answers 404",
                           **({"example": version} if version else {})})
    return parameters


def _infer(name: str, version: str | None, versioned: bool) -> dict:
    where = " of that version" if versioned else ""
    return {"post": {
        "tags": [TAG],
        "operationId": "oip_model_version_infer" if versioned else "oip_model_infer",
        "summary": f"Inference{where}",
        "description": "One input, `images` (BYTES [N]: encoded images, in JSON each in base64) or `pixels` "
                       "(UINT8 [N, S, S, 3], resized and cropped by the client as the model's metadata says). "
                       "Outputs by name: `probabilities`, `top_k_labels`, `top_k_scores`, `top_k_indices`, "
                       "`embedding`, and any layer (`conv1` ... `fc8`). A JSON body, or the same JSON followed by "
                       f"binary tensor data (Triton's extension) as application/octet-stream with `{HEADER_LENGTH}` "
                       "giving the JSON's length. Shed like /classify at capacity: one forward pass per image "
                       "(two with feature maps).",
        "parameters": [*_path_parameters(name, version, versioned), {
            "name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
            "description": "with binary tensor data: the length in bytes of the JSON at the start of the body "
                           "(absent: the whole body is JSON)"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("OipInferenceRequest"), "example": {
                "id": "42", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [EXAMPLE_IMAGE]}],
                "outputs": [{"name": "top_k_labels", "parameters": {"top_k": 3}}, {"name": "top_k_scores"}]}},
            "application/octet-stream": {"schema": {
                "type": "string", "format": "binary",
                "description": f"the inference request's JSON (its first `{HEADER_LENGTH}` bytes), then each "
                               "binary input's `binary_data_size` bytes, in input order: little-endian, row-major; "
                               "a BYTES element is its 4-byte little-endian length and its bytes"}},
        }},
        "responses": {
            "200": {"description": "the outputs: as JSON, or (when an output asked for `binary_data`) the JSON "
                                   "followed by the binary outputs, in order",
                    "headers": {HEADER_LENGTH: {"schema": {"type": "integer"},
                                                "description": "with binary outputs: the JSON's length"}},
                    "content": {"application/json": {"schema": _ref("OipInferenceResponse")},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": _error("a malformed body, or a shape, datatype, size, output or parameter mismatch"),
            "401": UNAUTHORIZED,
            "404": UNKNOWN_MODEL,
            "413": _error("body, image-count or image-size over the limits"),
            "422": _error("an image that cannot be decoded, a channel out of range, or feature maps over the cap"),
            "503": _error("at capacity: retry after the Retry-After seconds", RETRY_AFTER),
        },
    }}


def _model_get(name: str, version: str | None, versioned: bool, ready: bool) -> dict:
    which = "that version of the model" if versioned else "the model"
    if ready:
        summary, operation, body = f"Whether {which} is ready", "ready", _json("OipModelReady", "served and ready")
    else:
        summary, operation, body = f"Metadata of {which}", "metadata", _json(
            "OipModelMetadata", "its inputs and outputs (datatype, shape), versions and preprocessing")
    return {"get": {
        "tags": [TAG],
        "operationId": f"oip_model{'_version' if versioned else ''}_{operation}",
        "summary": summary,
        "parameters": _path_parameters(name, version, versioned),
        "responses": {"200": body, "401": UNAUTHORIZED, "404": UNKNOWN_MODEL},
    }}


def oip_paths(name: str, version: str | None = None) -> dict:
    """The protocol's routes, with the served model's name and version as the path parameters' examples
    (a new dict each call: the spec is rewritten in place afterwards)."""
    model, versioned = "/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"
    return copy.deepcopy({
        "/v2": {"get": {
            "tags": [TAG], "operationId": "oip_server_metadata", "summary": "Server metadata",
            "responses": {"200": _json("OipServerMetadata", "name, version and extensions "
                                                            "(`binary_tensor_data`, `classification`)"),
                          "401": UNAUTHORIZED},
        }},
        "/v2/health/live": {"get": {
            "tags": [TAG], "operationId": "oip_server_live", "summary": "Liveness (open: no API key)",
            "responses": {"200": _json("OipServerLive", "live")},
        }},
        "/v2/health/ready": {"get": {
            "tags": [TAG], "operationId": "oip_server_ready", "summary": "Readiness (open: no API key)",
            "responses": {"200": _json("OipServerReady", "ready to serve"),
                          "503": _error("the model is still loading", RETRY_AFTER)},
        }},
        model: _model_get(name, version, False, False),
        versioned: _model_get(name, version, True, False),
        f"{model}/ready": _model_get(name, version, False, True),
        f"{versioned}/ready": _model_get(name, version, True, True),
        f"{model}/infer": _infer(name, version, False),
        f"{versioned}/infer": _infer(name, version, True),
    })


def served_model(pipeline) -> tuple[str, str | None]:
    """(name, version) of the model `pipeline` serves; before the service has started (None), the store's
    name alone."""
    from model.store import DEFAULT_TAG
    from service.oip.app import model_identity

    if pipeline is None:
        return DEFAULT_TAG.split(":")[0], None
    return model_identity(pipeline.backend.current)


def add_oip(spec: dict, model: tuple[str, str | None]) -> None:
    """The protocol's paths (for `model`: its name and version), schemas and tag, into `spec`."""
    spec.setdefault("paths", {}).update(oip_paths(*model))
    # a copy: the spec is rewritten in place afterwards (valid_openapi_31)
    spec.setdefault("components", {}).setdefault("schemas", {}).update(copy.deepcopy(SCHEMAS))
    tags = spec.setdefault("tags", [])
    if not any(tag.get("name") == TAG for tag in tags):
        tags.append({"name": TAG, "description": TAG_DESCRIPTION})
