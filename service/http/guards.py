"""HTTP guards in front of every endpoint, one ASGI middleware per job, added in
service.service in the order they run:

  ObserveRequests where each request's time went: the latency breakdown, its spans, its access-log
                  line (service.http.observe)
  SpreadConnections  `Connection: close` on an answer of a worker serving more than its share of
                  the client connections, so that they spread over the API workers
  UniformErrors   every error body as the documented {"error", "detail"} (the Open Inference
                  Protocol's paths, /v2/..., answer its {"error": "..."} instead; service.oip.app)
  AmendDocs       /docs.json amended with what BentoML cannot know (service.http.rewrites)
  AddRetryAfter   Retry-After on every 503
  RequireApiKey   401 without the key, on every path not declared open (service.core.endpoints)
  RequireAdminKey 401 without ADMIN_KEY on the admin paths; 403 when none is set (they are off)
  AdmitWhenRoom   admission control's door: inference admitted at its estimated cost, or held in
                  line for room, or refused (503) -- before the body is read (service.runtime.admission)
  LimitBody       413 over MAX_BODY_BYTES; reads the body once and passes it on whole
  CheckMultipart  400 for a multipart body BentoML would choke on, or text in a file field

Pure ASGI, so they run before BentoML parses (and spools to disk) a body. The
multipart check does not parse the form: it reads only the part headers
(python-multipart's parser with header callbacks, no data kept), so the body
is parsed into a form once, by BentoML.
"""

from __future__ import annotations

import hmac


from service.core import endpoints, timeline
from service.core.refusals import Refusal
from service.core.running import Running
from service.http.multipart import multipart_refusal
from service.http.observe import ObserveRequests
from service.http.rewrites import UNIFORM_ALREADY, amend_docs, uniform_errors
from service.runtime.admission import TICKET


class _Guard:
    """An ASGI middleware that looks at HTTP requests only."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.guard(scope, receive, send)

    async def guard(self, scope, receive, send):
        raise NotImplementedError

    @staticmethod
    async def refuse(refusal: Refusal, scope, receive, send) -> None:
        scope[UNIFORM_ALREADY] = True  # rendered by service.core.refusals: UniformErrors need not rewrite it
        timeline.note_refusal(refusal.reason)
        oip = endpoints.speaks_oip(scope.get("path", ""))
        await (refusal.oip_response() if oip else refusal.response())(scope, receive, send)


class SpreadConnections(_Guard):
    """Keep each API worker's share of the client connections even (service.http.connection_board): a
    worker that serves more active connections than its share closes the connection of the request
    at hand (`Connection: close` on its answer), one answer at a time, until it is back to its share;
    the client reconnects, to whichever worker accepts first. No connection is closed while the
    workers are even, so steady clients keep theirs."""

    def __init__(self, app, workers: int):
        super().__init__(app)
        self.workers = workers
        self._board = None  # opened in the worker process, on its first request

    def board(self):
        if self._board is None:
            import bentoml

            from service.http.connection_board import ConnectionBoard
            from service.control.control_dir import ControlDir

            slot = (bentoml.server_context.worker_index or 1) - 1
            self._board = ConnectionBoard(ControlDir.for_this_server().path / "connections", self.workers,
                                          slot % self.workers)
        return self._board

    async def guard(self, scope, receive, send):
        client = scope.get("client")
        if self.workers < 2 or client is None:
            return await self.app(scope, receive, send)
        board, connection = self.board(), tuple(client)
        board.saw(connection)
        if not board.over_share():
            return await self.app(scope, receive, send)
        board.forget(connection)

        async def closing(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class UniformErrors(_Guard):
    async def guard(self, scope, receive, send):
        if endpoints.speaks_oip(scope.get("path", "")):  # its own error bodies (service.oip.app)
            return await self.app(scope, receive, send)
        await self.app(scope, receive, uniform_errors(send, scope))


class AmendDocs(_Guard):
    def __init__(self, app, running: Running):
        super().__init__(app)
        self.running = running

    async def guard(self, scope, receive, send):
        if scope.get("path") == "/docs.json":
            send = amend_docs(send, self.running)
        await self.app(scope, receive, send)


class AddRetryAfter(_Guard):
    def __init__(self, app, retry_after_s: int):
        super().__init__(app)
        self.retry_after = str(retry_after_s).encode()

    async def guard(self, scope, receive, send):
        async def wrapped(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    headers.append((b"retry-after", self.retry_after))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, wrapped)


class _Check(_Guard):
    """A guard that decides from the request line and headers alone: `check(scope)` gives a refusal,
    or None to pass the request on."""

    def __init__(self, app, setting=None):
        super().__init__(app)
        self.setting = setting

    async def guard(self, scope, receive, send):
        refusal = self.check(scope)
        if refusal is not None:
            return await self.refuse(refusal, scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> Refusal | None:
        raise NotImplementedError


class RequireApiKey(_Check):
    """setting: API_KEY (None: no check)."""

    def check(self, scope) -> Refusal | None:
        path = scope.get("path", "")
        exempt = endpoints.is_open(path) or endpoints.is_admin(path)  # admin paths have a key of their own
        if self.setting and not exempt and not _bearer_matches(scope, self.setting):
            return _unauthorized("key")
        return None


class RequireAdminKey(_Check):
    """setting: ADMIN_KEY. The admin endpoints (service.core.endpoints, `admin=True`) need it; with none set
    they are off: moving the served model is a deliberate opt-in (SECURITY.md)."""

    def check(self, scope) -> Refusal | None:
        if not endpoints.is_admin(scope.get("path", "")):
            return None
        if not self.setting:
            return Refusal(403, "admin_off", "model updates without a restart are off: set ADMIN_KEY")
        return None if _bearer_matches(scope, self.setting) else _unauthorized("admin key")


class AdmitWhenRoom(_Guard):
    """Admission control's door (service.runtime.admission), before the body is read: a request to an endpoint
    that runs the model is admitted at a cost estimated from its Content-Length, waits in line for
    room, or is refused (503 + Retry-After) with its body unread. Its ticket is held until the answer
    is sent; the endpoint settles it to the exact cost once the request is parsed."""

    def __init__(self, app, retry_after_s: int, running: Running):
        super().__init__(app)
        self.retry_after_s = retry_after_s
        self.running = running

    async def guard(self, scope, receive, send):
        path, method = scope.get("path", ""), scope.get("method", "")
        pipeline = self.running.pipeline if endpoints.is_sheddable(method, path) else None
        if pipeline is None:  # not an inference endpoint, or the service not started: BentoML answers
            return await self.app(scope, receive, send)
        admission, metrics = pipeline.admission, pipeline.metrics
        endpoint, body_bytes = endpoints.find(path), _content_length(scope) or 0
        label, lane = endpoint.label, endpoint.lane
        with timeline.stage("admission"):
            ticket = await admission.enter(admission.door_estimate(label, body_bytes), label, body_bytes, lane,
                                           admission.door_share(label, body_bytes) if lane else 0.0)
        if ticket is None:
            metrics.refusals.labels(label, "overloaded").inc()
            return await self.refuse(Refusal.overloaded(self.retry_after_s), scope, receive, send)
        metrics.observe_admission(admission)
        status = 0

        async def note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = TICKET.set(ticket)
        try:
            await self.app(scope, receive, note_status)
        finally:
            TICKET.reset(token)
            admission.release(ticket, served=status == 200)
            metrics.observe_admission(admission)


class LimitBody(_Guard):
    def __init__(self, app, max_body_bytes: int):
        super().__init__(app)
        self.max_body_bytes = max_body_bytes

    async def guard(self, scope, receive, send):
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await self.refuse(self._too_large(f"{declared:,} bytes"), scope, receive, send)
        with timeline.stage("body"):
            body, too_large = await _read_body(receive, self.max_body_bytes)
        if too_large:
            return await self.refuse(self._too_large("more"), scope, receive, send)
        await self.app(scope, _replay(body), send)

    def _too_large(self, told: str) -> Refusal:
        return Refusal(413, "body_too_large", f"request body is {told}; the limit is {self.max_body_bytes:,} bytes")


class CheckMultipart(_Guard):
    """After LimitBody: the body arrives in one message."""

    async def guard(self, scope, receive, send):
        content_type = _header(scope, b"content-type") or b""
        if scope.get("method") != "POST" or not content_type.lower().startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        body, _ = await _read_body(receive, None)
        refusal = multipart_refusal(content_type, body)
        if refusal is not None:
            return await self.refuse(refusal, scope, _replay(body), send)
        await self.app(scope, _replay(body), send)


def _unauthorized(what: str) -> Refusal:
    return Refusal(401, "unauthorized", f"missing or wrong 'Authorization: Bearer <{what}>'",
                   {"WWW-Authenticate": "Bearer"})


def _bearer_matches(scope, key: str) -> bool:
    value = _header(scope, b"authorization")
    if value is None:
        return False
    scheme, _, token = value.partition(b" ")
    # compare_digest: the time taken does not reveal how much of the key matched
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


def _header(scope, name: bytes) -> bytes | None:
    """The first value of a request header (ASGI gives names lower-cased)."""
    return next((value for key, value in scope.get("headers", []) if key == name), None)


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _read_body(receive, limit: int | None) -> tuple[bytes, bool]:
    """The whole request body, or (b"", True) as soon as it passes `limit` bytes."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if limit is not None and total > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def add_guards(service_class, config, layout, running: Running) -> None:
    """Put the guards in front of the service, outermost first (BentoML's add_asgi_middleware); those that
    need the worker's pipeline reach it through `running`."""
    service_class.add_asgi_middleware(ObserveRequests, running=running, access_log=config.access_log == "json")
    service_class.add_asgi_middleware(SpreadConnections, workers=layout.api_workers if config.spread_connections else 1)
    service_class.add_asgi_middleware(UniformErrors)
    service_class.add_asgi_middleware(AmendDocs, running=running)
    service_class.add_asgi_middleware(AddRetryAfter, retry_after_s=config.retry_after_s)
    service_class.add_asgi_middleware(RequireApiKey, setting=config.api_key)
    service_class.add_asgi_middleware(RequireAdminKey, setting=config.admin_key)
    service_class.add_asgi_middleware(AdmitWhenRoom, retry_after_s=config.retry_after_s, running=running)
    service_class.add_asgi_middleware(LimitBody, max_body_bytes=config.max_body_bytes)
    service_class.add_asgi_middleware(CheckMultipart)
