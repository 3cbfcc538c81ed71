"""The guards in front of the service, each on its own (service.http.guards), on a small real ASGI app:
the declaration in service.core.endpoints decides what is open, so auth fails closed."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.core import endpoints
from service.http.connection_board import ConnectionBoard
from service.http.guards import (AddRetryAfter, CheckMultipart, LimitBody, RequireApiKey, SpreadConnections,
                            UniformErrors)

KEY = "k3y"


def _app(*paths: str) -> Starlette:
    async def answer(request):
        await request.body()
        return PlainTextResponse(f"reached {request.url.path}")

    return Starlette(routes=[Route(path, answer, methods=["GET", "POST"]) for path in paths])


def _call(app, method: str, path: str, peer: tuple[str, int] = ("127.0.0.1", 123), **kwargs) -> httpx.Response:
    """One request to `app`, from the client address `peer` (one address: one connection)."""
    async def go():
        transport = httpx.ASGITransport(app=app, client=peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_route_nobody_declared_needs_the_key():
    assert endpoints.find("/brand-new") is None  # added to the app, never to service.core.endpoints
    app = RequireApiKey(_app("/brand-new", "/livez", "/classify"), setting=KEY)
    refused = _call(app, "GET", "/brand-new")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert _call(app, "GET", "/brand-new", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert _call(app, "GET", "/brand-new", headers={"Authorization": f"Bearer {KEY}"}).text == "reached /brand-new"


def test_the_handlers_labels_find_the_lanes_the_table_declares():
    """service.service and service.oip.app settle a request's share in the lane found by their endpoint's
    label: a label that missed the table would put the request in no lane at all."""
    from service.oip import infer as oip_infer
    assert {label: endpoints.lane_of(label) for label in ("classify", "embed", "feature_maps", "gradcam", "explain",
                                                         oip_infer.ENDPOINT)} == {
        "classify": "batch", "embed": "batch", "feature_maps": "", "gradcam": "attribution", "explain": "attribution",
        "v2_infer": "batch"}
    assert endpoints.lane_of("model") == ""  # not inference


def test_only_declared_open_paths_skip_the_key():
    app = RequireApiKey(_app("/livez", "/metrics", "/ui/index.html", "/classify", "/model"), setting=KEY)
    for open_path in ("/livez", "/metrics", "/ui/index.html"):
        assert _call(app, "GET", open_path).status_code == 200, open_path
    for closed in ("/classify", "/model", "/uix", "/livez/../model"):
        assert _call(app, "GET", closed).status_code == 401, closed


def test_no_key_configured_means_no_check():
    assert _call(RequireApiKey(_app("/brand-new"), setting=None), "GET", "/brand-new").status_code == 200


def test_body_over_the_limit_is_refused_before_the_app_reads_it():
    app = LimitBody(_app("/classify"), max_body_bytes=100)
    declared = _call(app, "POST", "/classify", content=b"x" * 101)
    assert declared.status_code == 413 and declared.json()["error"] == "body_too_large"

    async def chunks():  # no Content-Length: counted while read
        for _ in range(3):
            yield b"x" * 60

    streamed = _call(app, "POST", "/classify", content=chunks())
    assert streamed.status_code == 413
    assert _call(app, "POST", "/classify", content=b"x" * 100).text == "reached /classify"


def test_text_in_a_file_field_is_refused_and_files_pass():
    app = LimitBody(CheckMultipart(_app("/classify")), max_body_bytes=10_000)
    url_in_field = _call(app, "POST", "/classify", files=[("images", (None, "http://example.com/cat.jpg"))])
    assert url_in_field.status_code == 400 and url_in_field.json()["error"] == "file_field_not_a_file"
    uploaded = _call(app, "POST", "/classify", files=[("images", ("a.png", b"\x89PNG", "image/png"))])
    assert uploaded.text == "reached /classify"


def test_every_503_carries_retry_after_and_errors_are_uniform():
    async def overloaded(request):
        return PlainTextResponse("busy", status_code=503)

    async def framework_error(request):
        from starlette.responses import JSONResponse

        return JSONResponse([{"error": "bad", "detail": [{"loc": ["body", "top_k"], "msg": "too small"}]}], 400)

    inner = Starlette(routes=[Route("/busy", overloaded), Route("/bad", framework_error)])
    app = UniformErrors(AddRetryAfter(inner, retry_after_s=2))
    assert _call(app, "GET", "/busy").headers["retry-after"] == "2"
    assert _call(app, "GET", "/bad").json() == {"error": "bad", "detail": "body.top_k: too small"}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_board_counts_each_workers_active_connections_and_its_share(tmp_path):
    clock = FakeClock()
    first, second = (ConnectionBoard(tmp_path / "connections", 2, slot, clock) for slot in (0, 1))
    for port in range(5):
        first.saw(("127.0.0.1", port))
    assert first.over_share()  # 5 of 5: its share is 3
    second.saw(("127.0.0.1", 100))
    assert first.over_share() and not second.over_share()  # 5 and 1 of 6: shares of 3
    for port in range(3):
        first.forget(("127.0.0.1", port))
    assert not first.over_share() and not second.over_share()  # 2 and 1 of 3: shares of 2
    clock.now += 2 * ConnectionBoard.WINDOW_S  # the second worker heard nothing since: it counts as none
    first.saw(("127.0.0.1", 3))
    assert len(first._seen) == 1  # connections idle for the window are not counted
    first.saw(("127.0.0.1", 4))
    assert first.over_share()  # two connections, when the other worker serves none


def test_a_worker_over_its_share_closes_one_connection_per_answer_and_no_more(tmp_path):
    """Two workers (two guards sharing a board): the first takes four connections, the second one."""
    first, second = SpreadConnections(_app("/livez"), workers=2), SpreadConnections(_app("/livez"), workers=2)
    first._board, second._board = (ConnectionBoard(tmp_path / "connections", 2, slot) for slot in (0, 1))

    def get(app, port: int) -> str | None:
        return _call(app, "GET", "/livez", peer=("127.0.0.1", port)).headers.get("connection")

    assert get(first, 1) is None  # 1 of 1
    assert get(second, 9) is None  # 1 of 2
    assert [get(first, port) for port in (2, 3, 4)] == [None, "close", "close"]  # 2 of 3 is its share; 3 of 4 not
    assert get(first, 1) is None and get(first, 2) is None and get(second, 9) is None  # even: nobody is closed
    alone = SpreadConnections(_app("/livez"), workers=1)  # one worker: nothing to spread, no board
    assert all(_call(alone, "GET", "/livez").headers.get("connection") is None for _ in range(3))
    assert alone._board is None
