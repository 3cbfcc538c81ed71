"""HTTP guards in front of every endpoint: API key, admission (503 before
the body is read), body-size limit, unparseable multipart and text in file
fields refused, Retry-After on every 503, uniform error bodies, the amended
OpenAPI spec.

Pure ASGI, so they run before BentoML parses (and spools to disk) a body.
The multipart check does not parse the form: it reads only the part headers
(python-multipart's parser with header callbacks, no data kept), so the
body is parsed into a form once, by BentoML.
"""

from __future__ import annotations

import hmac
import json

from python_multipart.multipart import MultipartParser, parse_options_header

from service.rewrites import amend_docs, uniform_errors

# Inference and introspection need the key when one is set; health, metrics,
# the OpenAPI spec and the UI's static files stay open.
PROTECTED_PREFIXES = ("/classify", "/embed", "/feature_maps", "/gradcam", "/explain", "/model", "/kernels", "/atlas")
# Multipart fields that must carry uploaded files. BentoML would treat a plain
# text value in such a field as a URL and download it (server-side request
# forgery); we refuse that before BentoML sees the form.
FILE_FIELDS = ("images", "image")
# Inference paths refused before their body is even read when the model is full.
SHEDDABLE_PREFIXES = ("/classify", "/embed", "/feature_maps", "/gradcam", "/explain")


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
    def __init__(self, app, max_body_bytes: int, api_key: str | None, retry_after_s: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
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
            refusal = _multipart_refusal(scope, body)
            if refusal is not None:
                return await _send_json(send, 400, refusal)
            receive = _replay(body)
        if path == "/docs.json":
            send = amend_docs(send, SHEDDABLE_PREFIXES)
        await self.app(scope, receive, self._with_retry_after(uniform_errors(send)))

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


def _multipart_refusal(scope, body: bytes) -> dict | None:
    """What is wrong with a multipart body, read from its part headers alone: a body BentoML would
    choke on (a 500 there), or a text value in a file field (which BentoML would fetch as a URL)."""
    content_type = _header(scope, b"content-type") or b""
    if not content_type.lower().startswith(b"multipart/"):
        return None
    malformed = {"error": "malformed_multipart", "detail": "the multipart/form-data body could not be parsed"}
    boundary = _multipart_boundary(content_type)
    if boundary is None:
        return malformed  # multipart without a boundary cannot be parsed at all
    names_without_filename: list[bytes] = []
    header: dict[bytes, bytearray] = {}
    current = bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current[:] = data[start:end].lower()
        header.setdefault(bytes(current), bytearray())

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[bytes(current)] += data[start:end]

    def on_headers_finished() -> None:
        _, params = parse_options_header(bytes(header.get(b"content-disposition", b"")))
        if b"filename" not in params:  # a plain text part (a file part always names its file)
            names_without_filename.append(params.get(b"name", b""))
        header.clear()

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_headers_finished": on_headers_finished})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:
        return malformed
    if any(name.decode("latin-1") in FILE_FIELDS for name in names_without_filename):
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
