"""The guards in front of the service, each on its own (service.guards), on a small real ASGI app:
the declaration in service.endpoints decides what is open, so auth fails closed."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service import endpoints
from service.guards import (AddRetryAfter, CheckMultipart, LimitBody, RecycleConnections, RequireApiKey,
                            UniformErrors)

KEY = "k3y"


def _app(*paths: str) -> Starlette:
    async def answer(request):
        await request.body()
        return PlainTextResponse(f"reached {request.url.path}")

    return Starlette(routes=[Route(path, answer, methods=["GET", "POST"]) for path in paths])


def _call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_route_nobody_declared_needs_the_key():
    assert endpoints.find("/brand-new") is None  # added to the app, never to service.endpoints
    app = RequireApiKey(_app("/brand-new", "/livez", "/classify"), setting=KEY)
    refused = _call(app, "GET", "/brand-new")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert _call(app, "GET", "/brand-new", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert _call(app, "GET", "/brand-new", headers={"Authorization": f"Bearer {KEY}"}).text == "reached /brand-new"


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


def test_a_connection_is_closed_after_its_nth_answer_and_counted_afresh():
    app = RecycleConnections(_app("/livez"), max_requests=3)

    async def go():  # one client, one connection ("client" in the ASGI scope: the same host and port)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [(await client.get("/livez")).headers.get("connection") for _ in range(7)]

    assert asyncio.run(go()) == [None, None, "close", None, None, "close", None]
    never = RecycleConnections(_app("/livez"), max_requests=0)
    assert all(_call(never, "GET", "/livez").headers.get("connection") is None for _ in range(5))
