"""HTTP guards in front of every endpoint: the internal route closed to
clients, API key, admission (503 before the body is read), body-size limit,
unparseable multipart and text in file fields refused, Retry-After on every
503, uniform error bodies, the amended OpenAPI spec.

Pure ASGI, so they run before BentoML parses (and spools to disk) a body.
"""

from __future__ import annotations

import hmac
import json

from service.rewrites import amend_docs, uniform_errors

# Inference and introspection need the key when one is set; health, metrics,
# the OpenAPI spec and the UI's static files stay open.
PROTECTED_PREFIXES = ("/classify", "/embed", "/feature_maps", "/gradcam", "/model", "/kernels")
# Multipart fields that must carry uploaded files. BentoML would treat a plain
# text value in such a field as a URL and download it (server-side request
# forgery); we refuse that before BentoML sees the form.
FILE_FIELDS = ("images", "image")
# Inference paths refused before their body is even read when the model is full.
SHEDDABLE_PREFIXES = ("/classify", "/embed", "/feature_maps", "/gradcam")
# BentoML serves every API over HTTP, the internal batched forward included;
# only the service itself (holding the per-process token) may call it.
INTERNAL_PREFIX = "/internal/"
INTERNAL_TOKEN_HEADER = b"x-internal-token"


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    def __init__(self, app, max_body_bytes: int, api_key: str | None, retry_after_s: int, internal_token: str):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.retry_after = str(retry_after_s).encode()
        self.internal_token = internal_token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith(INTERNAL_PREFIX) and not self._internal(scope):
            return await _send_json(send, 404, {"error": "not_found", "detail": f"no route {path}"})
        if self.api_key and path.startswith(PROTECTED_PREFIXES) and not self._authorized(scope):
            return await _send_json(
                send, 401, {"error": "unauthorized", "detail": "missing or wrong 'Authorization: Bearer <key>'"},
                [(b"www-authenticate", b"Bearer")],
            )
        if scope.get("method") == "POST" and path.startswith(SHEDDABLE_PREFIXES) and _model_full(path):
            return await _send_json(
                send, 503, {"error": "overloaded", "detail": "the model is at capacity; retry shortly"},
                [(b"retry-after", self.retry_after)],
            )
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            declared = self._content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                return await self._too_large(send, declared)
            body, too_large = await self._read_body(receive)
            if too_large:
                return await self._too_large(send, None)
            refusal = await _multipart_refusal(scope, body)
            if refusal is not None:
                return await _send_json(send, 400, refusal)
            receive = _replay(body)
        if path == "/docs.json":
            send = amend_docs(send, SHEDDABLE_PREFIXES, INTERNAL_PREFIX)
        await self.app(scope, receive, self._with_retry_after(uniform_errors(send)))

    def _internal(self, scope) -> bool:
        return hmac.compare_digest(_header(scope, INTERNAL_TOKEN_HEADER) or b"", self.internal_token)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(b" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    @staticmethod
    def _content_length(scope) -> int | None:
        value = _header(scope, b"content-length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False

    async def _too_large(self, send, size: int | None) -> None:
        told = f"{size:,} bytes" if size is not None else "more"
        await _send_json(send, 413, {
            "error": "body_too_large",
            "detail": f"request body is {told}; the limit is {self.max_body_bytes:,} bytes",
        })

    def _with_retry_after(self, send):
        async def wrapped(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    headers.append((b"retry-after", self.retry_after))
                message = {**message, "headers": headers}
            await send(message)

        return wrapped


def _model_full(path: str) -> bool:
    import bentoml

    service = bentoml.get_current_service()
    admission = getattr(service, "admission", None)
    if admission is None or not admission.full():
        return False
    service.metrics.refusals.labels(path.strip("/").split("/")[0], "overloaded").inc()
    return True


def _header(scope, name: bytes) -> bytes | None:
    """The first value of a request header (ASGI gives names lower-cased)."""
    return next((value for key, value in scope.get("headers", []) if key == name), None)


async def _multipart_refusal(scope, body: bytes) -> dict | None:
    """Parse a multipart body the way BentoML will, once, and say what is wrong with it:
    a body it would choke on (a 500 there), or a text value in a file field."""
    content_type = _header(scope, b"content-type") or b""
    if not content_type.lower().startswith(b"multipart/"):
        return None
    malformed = {"error": "malformed_multipart", "detail": "the multipart/form-data body could not be parsed"}
    if _multipart_boundary(content_type) is None:
        return malformed  # multipart without a boundary cannot be parsed at all
    from starlette.requests import Request

    try:
        form = await Request(scope, _replay(body)).form()
    except Exception:
        return malformed
    # A part without a filename is a str in the form; BentoML would fetch it as a URL.
    text_in_file_field = any(isinstance(value, str) for key, value in form.multi_items() if key in FILE_FIELDS)
    await form.close()
    if text_in_file_field:
        return {"error": "file_field_not_a_file",
                "detail": "multipart fields `images`/`image` must be uploaded files; URLs are not fetched"}
    return None


def _multipart_boundary(content_type: bytes) -> bytes | None:
    if content_type.lower().startswith(b"multipart/form-data"):
        for param in content_type.split(b";")[1:]:
            key, _, val = param.strip().partition(b"=")
            if key.lower() == b"boundary":
                return val.strip(b'"')
    return None


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
