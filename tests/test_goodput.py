"""Overload by impolite clients, behaviour only: clients that retry the moment they are refused,
batch requests, 64 single-image clients, a mix with occlusion maps, and a CPU hog in the middle,
against a real `bentoml serve` (loadtests.goodput; its goodput ratios are speed gates, in
`make loadtest-goodput`). On any machine, however busy: no answer but 200 and 503 with
Retry-After, every accepted request within the hang guard, something served, the service healthy
afterwards -- and admission control's door refusing without reading bodies."""

from __future__ import annotations

import pytest

from loadtests import goodput
from testkit.images import photos
from testkit.server import ServerProcess

# A 1 s budget: the small model on 2 shared cores is overloaded by these loads, so the door refuses.
SERVER_ENV = {"MAX_LATENCY_MS": "1000", "PRECISION": "fp32"}
SECONDS = 4.0


@pytest.fixture(scope="module")
def storm_server(cli_env, registered_model, tmp_path_factory):
    server = ServerProcess({**cli_env, **SERVER_ENV}, tmp_path_factory.mktemp("goodput") / "server.log")
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool():
    return photos((640,), ("JPEG",))


@pytest.mark.parametrize("scenario", ["storm", "singles", "mix", "hog"])
def test_impolite_clients_get_answers_or_fast_refusals_and_the_service_lives(storm_server, pool, scenario):
    load, _ = goodput.loads_of(scenario, pool)
    if scenario == "singles":  # 128 clients would be mostly the load generator's own CPU here
        load = {goodput.Clients(64, 1): bodies for bodies in load.values()}
    result = goodput.run_load(storm_server, scenario, load, SECONDS)
    print("\n" + goodput.describe(scenario, {**result, "over_reference": float("nan"), "reference_goodput": 0.0,
                                             "reference_cpu_ms_per_unit": float("nan")}))
    assert goodput.check(result, "behaviour") == []
    statuses = {status for group in result["groups"].values() for status in group["statuses"]}
    assert statuses <= {"200", "503"}, statuses


def test_the_door_refuses_before_reading_the_body_and_admits_from_the_line():
    """AdmitWhenRoom on a full worker: a request waits in line, body unread, and is refused (503 +
    Retry-After) without one byte of its body received; one that finds room meanwhile is admitted."""
    import asyncio
    from types import SimpleNamespace

    from service.core.running import Running
    from service.http.guards import AddRetryAfter, AdmitWhenRoom
    from service.runtime.admission import Admission

    admission = Admission(budget_seconds=1.0, initial_rate=10.0, wait_seconds=0.2)
    counter = SimpleNamespace(inc=lambda: None)
    pipeline = SimpleNamespace(admission=admission, metrics=SimpleNamespace(
        refusals=SimpleNamespace(labels=lambda *labels: counter), observe_admission=lambda admission: None))
    running = Running()
    running.service = SimpleNamespace(pipeline=pipeline)
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = AddRetryAfter(AdmitWhenRoom(app, retry_after_s=1, running=running), retry_after_s=1)

    async def call() -> tuple[int, dict, int]:
        received, sent = [0], []

        async def receive():
            received[0] += 1
            return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify",
                 "headers": [(b"content-length", b"1000")]}
        await guard(scope, receive, send)
        start = sent[0]
        return start["status"], dict(start.get("headers", [])), received[0]

    async def scenario():
        held = await admission.enter(10)  # a second of work in flight: the cap (10 units) is full
        status, headers, received = await call()
        assert (status, received) == (503, 0) and headers[b"retry-after"] == b"1"
        assert reached == []
        waiting = asyncio.create_task(call())
        await asyncio.sleep(0.05)
        admission.release(held, served=True)  # room, while it waits in line: admitted
        status, _, received = await waiting
        assert (status, received) == (200, 1) and reached == ["/classify"]
        assert admission.requests == 0 and admission.inflight == 0

    asyncio.run(scenario())
