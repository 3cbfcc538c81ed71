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
SECONDS = 5.0


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


def test_the_door_refuses_before_reading_the_body(storm_server):
    """A request that finds no room is refused with its body unread: a client that has not even sent
    its body yet gets its 503 (or is admitted) from the headers alone."""
    import socket
    import time

    load, _ = goodput.loads_of("storm", photos((640,), ("JPEG",)))
    refused_unsent = []

    def headers_only() -> bytes:
        with socket.create_connection(("127.0.0.1", storm_server.port), timeout=20) as sock:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 400000\r\n\r\n")
            sock.settimeout(3)
            try:
                return sock.recv(4096)
            except TimeoutError:
                return b""  # admitted: it waits for the body we never send

    import threading

    stop = time.monotonic() + SECONDS

    def probe():
        while time.monotonic() < stop:
            answer = headers_only()
            if answer.startswith(b"HTTP/1.1 503"):
                refused_unsent.append(answer)

    prober = threading.Thread(target=probe)
    prober.start()
    goodput.run_load(storm_server, "storm", load, SECONDS)
    prober.join()
    assert refused_unsent, "no request was refused from its headers alone while the storm filled the service"
    assert all(b"retry-after" in answer.lower() for answer in refused_unsent)
