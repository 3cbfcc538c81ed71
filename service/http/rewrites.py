"""Rewrites of responses on their way out: uniform error bodies, and the
OpenAPI spec amended with what BentoML cannot know (the /ui link, the
refusals our guards return, read from service.core.endpoints). Pure ASGI `send`
wrappers, used by service.http.guards.
"""

from __future__ import annotations

import json
import logging

from service.core import endpoints
from service.core.package import package_version
from service.oip.spec import add_oip, served_model

logger = logging.getLogger(__name__)


def _rewrite_body(send, transform):
    """Buffer one response and pass its (status, headers, body) through `transform`."""
    start: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        headers = list(start.get("headers", []))
        body = b"".join(chunks)
        try:
            body = transform(start.get("status", 200), headers, body)
        except Exception:  # a bug here must not hang the response: send it as the framework wrote it
            logger.exception("could not rewrite the response; sending it unchanged")
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _is_json(headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


UNIFORM_ALREADY = "cnn.error_body_uniform"  # set in the ASGI scope by a guard whose refusal is ours already


def uniform_errors(send, scope: dict | None = None):
    """Every error body as the documented {"error": str, "detail": str}.

    BentoML's own refusals come as a one-element list, or with a list of
    pydantic errors as `detail`, which contradicts the 400 schema BentoML
    itself puts in the OpenAPI spec (found by schemathesis). The guards'
    refusals are rendered right already (service.core.refusals) and pass untouched:
    under a retry storm, refusals are most of the requests, and buffering and
    re-parsing each body cost about as much as the rest of a refusal."""

    def transform(status, headers, body):
        if status < 400 or not _is_json(headers):
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, list) and data and isinstance(data[0], dict):
            data = data[0]
        if not isinstance(data, dict):
            return body
        detail = data.get("detail", "")
        if isinstance(detail, list):
            detail = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', ())) or 'body'}: {item.get('msg', item)}"
                if isinstance(item, dict) else str(item) for item in detail
            )
        elif not isinstance(detail, str):
            detail = json.dumps(detail)
        return json.dumps({"error": str(data.get("error", "error")), "detail": detail}).encode()

    buffered = _rewrite_body(send, transform)
    is_error = False

    async def wrapped(message):
        nonlocal is_error
        if message["type"] == "http.response.start":
            is_error = message["status"] >= 400 and not (scope or {}).get(UNIFORM_ALREADY)
        # Only error bodies are buffered and rewritten; successes stream through untouched.
        await (buffered if is_error else send)(message)

    return wrapped


UI_LINK = (
    "**[Open the feature-map inspector](/ui/)**: upload an image and see the predictions and what "
    "every layer of the CNN computes.\n\n"
)
ERROR_RESPONSES = {
    "401": "API key missing or wrong (only when API_KEY is set)",
    "413": "body, image or image count over the limits",
    "422": "an image that cannot be decoded, or an unknown layer, channel or class",
    "503": "at capacity: retry after the Retry-After seconds",
}


_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}

# The GET endpoints of service.http.introspection: mounted Starlette routes, which
# BentoML does not put in the spec itself.
INTROSPECTION_PATHS = {
    "/model": {"get": {
        "summary": "The served model",
        "description": "Preset, classes, preprocessing, training metrics, checkpoint sha256, device, dtype, "
                       "batching settings, limits and the layer table (per layer: kernel, stride, padding, "
                       "output shape, receptive field, jump, parameters, multiply-adds).",
        "responses": {
            "200": {"description": "the model description", "content": {"application/json": {"schema": {
                "type": "object",
                "required": ["tag", "preset", "classes", "preprocessing", "weights_sha256", "device", "dtype",
                             "layers"],
                "properties": {
                    "tag": {"type": "string"}, "preset": {"type": "string"},
                    "card": {"type": "object", "description": "what the model knows: dataset, purpose, classes, "
                             "preset, accuracy on its test split, version, atlas, sample names, the "
                             "low-confidence threshold",
                             "required": ["version", "dataset", "purpose", "num_classes", "test_top1"],
                             "properties": {
                                 "version": {"type": "string"}, "dataset": {"type": "string"},
                                 "purpose": {"type": "string"}, "preset": {"type": "string"},
                                 "num_classes": {"type": "integer"},
                                 "test_top1": {"type": ["number", "null"]}, "test_top5": {"type": ["number", "null"]},
                                 "test_split": {"type": ["string", "null"]}, "atlas": {"type": "boolean"},
                                 "samples": {"type": "array", "items": {"type": "string"}},
                                 "low_confidence_below": {"type": "number"}}},
                    "classes": {"type": "array", "items": {"type": "string"}},
                    "preprocessing": {"type": "object"}, "training": {"type": "object"},
                    "weights_sha256": {"type": "string"}, "device": {"type": "string"},
                    "dtype": {"type": "string"}, "batching": {"type": "object"}, "limits": {"type": "object"},
                    "layers": {"type": "array", "items": {"type": "object"}},
                },
            }}}},
            "401": {"description": ERROR_RESPONSES["401"], "content": _ERROR_BODY},
        },
    }},
    "/atlas": {"get": {
        "summary": "The channel atlas: what each conv channel responds to across a dataset",
        "description": "Built offline by `python -m training atlas`. With `channel`: that channel's top-9 "
                       "dataset patches (each cropped to the receptive field of the unit that fired) as a PNG "
                       "grid, with each patch's source image, position and activation. Without: every "
                       "channel of the layer, summarized.",
        "parameters": [
            {"name": "layer", "in": "query", "required": False, "schema": {"type": "string", "default": "conv1"},
             "description": "a conv layer name from GET /model"},
            {"name": "channel", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
             "description": "a channel of that layer"},
        ],
        "responses": {
            "200": {"description": "the channel's patches, or the layer's summary", "content": {"application/json": {
                "schema": {"type": "object", "required": ["layer"], "properties": {
                    "layer": {"type": "string"}, "channel": {"type": "integer"}, "dataset": {"type": "string"},
                    "receptive_field": {"type": "integer"}, "grid_png": {"type": "string"},
                    "patches": {"type": "array", "items": {"type": "object"}},
                    "channels": {"type": "array", "items": {"type": "object"}},
                }}}}},
            "400": {"description": "a channel that is not an integer", "content": _ERROR_BODY},
            "401": {"description": ERROR_RESPONSES["401"], "content": _ERROR_BODY},
            "404": {"description": "this model has no atlas", "content": _ERROR_BODY},
            "422": {"description": "not a conv layer of the atlas, or a channel out of range", "content": _ERROR_BODY},
        },
    }},
    "/samples": {"get": {
        "summary": "Sample images that fit the served model",
        "description": "For a model of the generated shapes, one shape of each class; for any other, "
                       "scikit-image's sample photos. Each is fetched from its `url`.",
        "responses": {
            "200": {"description": "the samples", "content": {"application/json": {"schema": {
                "type": "object", "required": ["dataset", "samples"], "properties": {
                    "dataset": {"type": "string"},
                    "samples": {"type": "array", "items": {"type": "object", "required": ["name", "url"],
                                "properties": {"name": {"type": "string"}, "url": {"type": "string"}}}},
                }}}}},
            "401": {"description": ERROR_RESPONSES["401"], "content": _ERROR_BODY},
        },
    }},
    "/samples/{name}": {"get": {
        "summary": "One sample image",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "a name from GET /samples"}],
        "responses": {
            "200": {"description": "the image", "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
            "401": {"description": ERROR_RESPONSES["401"], "content": _ERROR_BODY},
            "404": {"description": "no sample of that name for this model", "content": _ERROR_BODY},
        },
    }},
    "/kernels": {"get": {
        "summary": "Learned kernels as a PNG grid",
        "description": "The kernels of one conv layer, each scaled to [0, 1] on its own: conv1's in colour "
                       "(3 input channels), deeper layers as their mean over input channels.",
        "parameters": [{"name": "layer", "in": "query", "required": False,
                        "schema": {"type": "string", "default": "conv1"},
                        "description": "a conv layer name from GET /model"}],
        "responses": {
            "200": {"description": "the kernel grid", "content": {"image/png": {
                "schema": {"type": "string", "format": "binary"}}}},
            "401": {"description": ERROR_RESPONSES["401"], "content": _ERROR_BODY},
            "422": {"description": "not a conv layer of this model", "content": _ERROR_BODY},
        },
    }},
}


def _is_file(schema: dict) -> bool:
    """An upload (binary string), or a list of uploads."""
    items = schema.get("items")
    return schema.get("format") == "binary" or (isinstance(items, dict) and _is_file(items))


def declare_json_bodies(spec: dict, paths: tuple[str, ...]) -> None:
    """Declare the JSON request body each inference endpoint accepts besides multipart.

    BentoML documents only multipart for an API with file fields, yet takes the same
    fields as JSON, with the images in base64 (the README's examples use both). A
    generated client needs it: multipart clients send a list field as repeated
    parts, where BentoML reads one part holding a JSON array (the `encoding` it
    declares, which generators such as openapi-python-client ignore)."""
    for path in paths:
        body = spec["paths"].get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
        form = body.get("multipart/form-data", {}).get("schema")
        if form is None or "application/json" in body:
            continue
        fields = {k: v for k, v in form.get("properties", {}).items() if not _is_file(v)}
        body["application/json"] = {"schema": {**form, "properties": fields, "title": form.get("title", "Input")}}


def valid_openapi_31(spec: dict) -> dict:
    """BentoML's spec made valid OpenAPI 3.1 (checked by openapi-spec-validator in the tests).

    BentoML declares 3.0.2 but writes JSON Schema 2020-12 (`{"type": "null"}`),
    a non-standard `"type": "file"` for uploads, and, in the schemas inlined into
    the paths, drops the `null` from optional fields while keeping their `null`
    default -- so a client generated from it rejects our own `"stride": null`.
    OpenAPI 3.1 is JSON Schema 2020-12: declare it, write files as binary
    strings, and give every field whose default is null its `null` type back."""

    def fix(node):
        if isinstance(node, dict):
            if node.get("type") == "file":
                node["type"], node["format"] = "string", "binary"
                for key in ("content_type", "pil"):  # BentoML's own annotations, not JSON Schema
                    node.pop(key, None)
            if "default" in node and node["default"] is None and isinstance(node.get("type"), str) \
                    and node["type"] != "null":
                node["type"] = [node["type"], "null"]
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    fix(spec)
    spec["openapi"] = "3.1.0"
    return spec


def amend_docs(send, running):
    """The OpenAPI spec, amended: valid OpenAPI 3.1 (valid_openapi_31), a link to /ui
    (BentoML's page at / shows this description), the refusals the inference endpoints
    really return, and the routes BentoML does not know of: the GET endpoints of
    service.http.introspection and the Open Inference Protocol's (service.oip.spec), named for the
    model `running` serves (service.core.running)."""

    def transform(status, headers, body):
        if status != 200:
            return body
        try:
            spec = json.loads(body)
        except ValueError:
            return body
        info = spec.setdefault("info", {})
        info["description"] = UI_LINK + info.get("description", "")
        info["version"] = package_version()  # BentoML writes the bento's version, "None" when served from a checkout
        paths = spec.setdefault("paths", {})
        for endpoint in endpoints.INFERENCE:
            operation = paths.get(endpoint.path, {}).get("post")
            if operation is None:
                continue
            for code, description in ERROR_RESPONSES.items():
                if code == "503":
                    description = f"{description}. Admission charges a request {endpoint.cost}"
                operation["responses"].setdefault(code, {"description": description, "content": _ERROR_BODY})
        paths.update(INTROSPECTION_PATHS)
        add_oip(spec, served_model(running.pipeline))
        declare_json_bodies(spec, tuple(endpoint.path for endpoint in endpoints.INFERENCE))
        return json.dumps(valid_openapi_31(spec)).encode()

    return _rewrite_body(send, transform)
