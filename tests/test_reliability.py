"""Reliability and security under bad input, faults and overload -- with figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from testkit import corpus
from testkit.images import shape_png
from testkit.server import ROOT, ServerProcess, process_kind, serve_until_exit
from testkit.wait import wait_until

pytestmark = pytest.mark.slow
MAX_BODY = 3 * 1024 * 1024  # the session server's MAX_BODY_BYTES (conftest)


def send(url: str, case: corpus.Case) -> httpx.Response:
    if case.path.startswith("/kernels"):
        return httpx.get(f"{url}{case.path}", timeout=60)
    return httpx.post(f"{url}{case.path}", timeout=60, **case.kwargs)


CASES = corpus.build(MAX_BODY)


def test_corpus_is_big_enough():
    assert sum(1 for c in CASES if c.status != 200) >= 20
    assert sum(1 for c in CASES if c.status == 200) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_gets_the_right_answer(server, case):
    response = send(server.url, case)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    if case.status == 200:
        assert len(body["predictions"]) == 1
    else:
        assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"]
        if case.reason:
            assert body["error"] == case.reason


def test_worker_survives_the_corpus_and_memory_stays_bounded(server):
    pids = server.worker_pids()
    worker = psutil.Process(max(pids))

    def one_pass():
        for case in CASES:
            assert send(server.url, case).status_code < 500, case.name

    one_pass()  # warm: allocator pools, lazily loaded codecs
    before = worker.memory_info().rss
    for _ in range(4):
        one_pass()
    growth = worker.memory_info().rss - before
    print(f"\nworker RSS growth over 4 corpus passes ({4 * len(CASES)} requests): {growth / 2**20:.1f} MiB")
    assert server.worker_pids() == pids, "a worker restarted"
    assert growth < 64 * 2**20


def test_schemathesis_finds_no_server_error_and_no_spec_violation(server, tmp_path):
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(schemathesis), "run", f"{server.url}/docs.json", "--checks",
         "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
         "--max-examples", os.environ.get("FUZZ_EXAMPLES", "15"), "--phases", "examples,coverage,fuzzing",
         "--request-timeout", "30", "--seed", "1"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout
    print("\n" + "\n".join(result.stdout.strip().splitlines()[-30:]))  # the summary: operations, test cases


# ----- faults ---------------------------------------------------------------------------


@pytest.fixture
def own_server(cli_env, registered_model, tmp_path):
    servers = []

    def start(**env):
        server = ServerProcess({**cli_env, **env}, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def test_sigkill_worker_under_load_recovers(own_server):
    """A worker killed mid-load is replaced; meanwhile clients see only answers or dropped
    connections (never a wrong answer), and the service answers again."""
    server = own_server()
    files = [("images", ("x.png", shape_png(1), "image/png"))]
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    status = str(client.post(f"{server.url}/classify", files=files).status_code)
                except httpx.HTTPError as err:
                    status = type(err).__name__
                outcomes.append((time.time(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(1 for _, status in outcomes if status == "200") >= 20, 60, "load getting through")
    workers = [p for p in server.worker_pids() if _is_worker(p)]
    old_worker = min(workers)
    killed_at = time.time()
    os.kill(old_worker, signal.SIGKILL)
    replaced_at = None
    while time.time() - killed_at < 120:  # a new worker takes the killed one's place
        alive = [p for p in server.worker_pids() if _is_worker(p)]
        if old_worker not in alive and len(alive) == len(workers) and server.ready():
            replaced_at = time.time()
            break
        time.sleep(0.2)
    if replaced_at is not None:  # the load goes on through the replacement
        wait_until(lambda: sum(1 for t, status in outcomes if t > replaced_at and status == "200") >= 20, 60,
                   "answers after the worker was replaced")
    stop.set()
    for thread in threads:
        thread.join()
    assert replaced_at is not None, "the killed worker was never replaced"
    served_after = [t for t, status in outcomes if t > replaced_at and status == "200"]
    failures = sorted({s for t, s in outcomes if t >= killed_at and s != "200"})
    print(f"\nworker SIGKILLed under load: replaced after {replaced_at - killed_at:.1f} s; clients saw {failures}")
    assert served_after, "no request succeeded after the worker was replaced"
    assert all(s in {"200", "503", "ConnectError", "RemoteProtocolError", "ReadError", "ReadTimeout"}
               for _, s in outcomes), {s for _, s in outcomes}


def test_killed_model_worker_fails_no_request(own_server, tmp_path):
    """The split layout's model worker SIGKILLed under load (8 clients of /classify): every request in
    flight or sent meanwhile is answered 200 (its batch run again on the worker BentoML starts in the
    killed one's place, within the latency budget) or 503 + Retry-After with the refusal body, never
    anything else; each refusal and retry is counted with its own reason. With a budget longer than the
    replacement takes to start (30 s), every request is answered by it. (With a 1 s budget the same
    kill was answered 200 throughout in CI too: calls the killed worker had not accepted wait on its
    socket for the replacement; one budget is run, for the suite's time.) AlexNet in fp32 (random
    weights): a model slow enough that a batch is usually in flight when the kill lands (the tiny test
    model's quick batches were mostly missed)."""
    from testkit.metrics import metric_samples, metric_sum
    from testkit.models import untrained_checkpoint

    server = own_server(LAYOUT="split", API_WORKERS="2", PRECISION="fp32", MAX_LATENCY_MS="30000",
                        CHECKPOINT_DIR=str(untrained_checkpoint("alexnet", tmp_path / "alexnet")))
    files = [("images", ("x.png", shape_png(1), "image/png"))]
    outcomes: list[tuple[float, int, str, str | None]] = []  # (time, status, error reason, Retry-After)
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                response = client.post(f"{server.url}/classify", files=files)
                reason = "" if response.status_code == 200 else response.json().get("error", "")
                outcomes.append((time.time(), response.status_code, reason, response.headers.get("retry-after")))

    def model_workers() -> list[int]:
        return [p for p in server.worker_pids() if _is_worker(p) and _kind(p) == "model"]

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(1 for _, status, _, _ in outcomes if status == 200) >= 40, 60, "load getting through")
        [killed] = model_workers()
        killed_at = time.time()
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: model_workers() not in ([], [killed]), 120, "the model worker replaced")
        # answers after the kill from the replacement: the load went on through it
        wait_until(lambda: sum(1 for t, status, _, _ in outcomes if t > killed_at + 1 and status == 200) >= 40, 120,
                   "answers after the model worker was replaced")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    statuses = {(status, reason) for _, status, reason, _ in outcomes}
    samples = metric_samples(server.url)
    print(f"\nmodel worker SIGKILLed under load: {len(outcomes)} answers, "
          f"{sorted((s, r, sum(1 for o in outcomes if o[1:3] == (s, r))) for s, r in statuses)}; calls retried: "
          f"{ {o: metric_sum(samples, 'cnn_model_worker_retries_total', outcome=o) for o in ('answered', 'refused')} }")
    assert statuses <= {(200, ""), (503, "model_unavailable"), (503, "overloaded")}, statuses
    assert all(retry_after for _, status, _, retry_after in outcomes if status == 503)
    unavailable = sum(1 for _, status, reason, _ in outcomes if reason == "model_unavailable")
    assert metric_sum(samples, "cnn_refusals_total", endpoint="classify", reason="model_unavailable") == unavailable
    # Calls cut by the kill are retried (counted); calls not yet accepted by the killed worker wait on its
    # socket for the replacement instead (seen in CI: every answer 200 after 13 s, nothing retried).
    assert metric_sum(samples, "cnn_model_worker_retries_total", outcome="refused") <= unavailable
    # time enough for the replacement: cut calls ran again on it
    assert statuses == {(200, "")}
    assert metric_sum(samples, "cnn_model_worker_retries_total", outcome="refused") == 0


def _kind(pid: int) -> str:
    try:
        return process_kind(" ".join(psutil.Process(pid).cmdline()))
    except psutil.NoSuchProcess:
        return "gone"


def _is_worker(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process_kind(" ".join(process.cmdline())) != "other"
    except psutil.NoSuchProcess:
        return False


def test_sigterm_drains_in_flight_requests(own_server, tmp_path):
    from testkit.models import untrained_checkpoint

    # A slow model (AlexNet in fp32, one image per forward) and 8 requests of 8 images: about a
    # second of work, so requests are really in flight when SIGTERM lands. One API worker: the
    # in-flight count below is that worker's (with two, each request lands in either, and the other's
    # images would be invisible to the poll). A batches' lane of 64 images, so that admission takes all
    # eight requests in at once (by default it holds 1.25 batches of one image: one request at a time).
    checkpoint = untrained_checkpoint("alexnet", tmp_path / "alexnet")
    server = own_server(CHECKPOINT_DIR=str(checkpoint), API_WORKERS="1", MAX_BATCH_SIZE="1",
                        ADMISSION_BATCHES="64", MAX_LATENCY_MS="30000", PRECISION="fp32")
    files = [("images", (f"x{i}.png", shape_png(i), "image/png")) for i in range(8)]
    results: list[int | str] = []
    client = httpx.Client(base_url=server.url, timeout=120)  # thread-safe; one connection pool for all

    def request():
        try:
            results.append(client.post("/classify", files=files).status_code)
        except httpx.HTTPError as err:
            results.append(type(err).__name__)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    # SIGTERM only once every request is inside the service (admitted or already answered), never
    # while one is still connecting: a connection refused after SIGTERM is correct behaviour.
    deadline = time.time() + 120
    while time.time() < deadline:
        in_flight = client.get("/model").json()["batching"]["admission"]["inflight_requests"]
        if in_flight + len(results) >= 8:
            break
        time.sleep(0.01)
    os.killpg(server.process.pid, signal.SIGTERM)
    for thread in threads:
        thread.join()
    server.process.wait(timeout=60)
    client.close()
    print(f"\nSIGTERM with {in_flight} of 8 requests in flight: {results}")
    assert in_flight > 0, "every request finished before SIGTERM: nothing was drained"
    assert results == [200] * 8


def test_tampered_model_in_the_store_refuses_to_start(cli_env, tiny_run, run_cli, tmp_path):
    home = tmp_path / "store"
    env = {**cli_env, "BENTOML_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "training", "register", str(tiny_run)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    (weights,) = home.glob("models/cnn-classifier/*/weights.safetensors")
    blob = bytearray(weights.read_bytes())
    blob[100] ^= 0x01
    weights.write_bytes(bytes(blob))
    result = serve_until_exit(env)
    assert result.returncode != 0
    assert "sha256" in result.stdout + result.stderr


def test_bentoml_serve_refuses_a_bad_setting_at_start(cli_env, registered_model):
    done = serve_until_exit({**cli_env, "MAX_LATENCY_MS": "soon"})
    assert done.returncode != 0 and "MAX_LATENCY_MS='soon'" in done.stdout + done.stderr


def test_model_tag_cannot_walk_out_of_the_store(cli_env, tmp_path):
    result = serve_until_exit({**cli_env, "MODEL_TAG": "../../../etc/passwd"})
    assert result.returncode != 0
    assert "cannot serve" in result.stdout + result.stderr


def test_binds_loopback_unless_told_otherwise(cli_env, registered_model, tmp_path):
    server = ServerProcess(cli_env, tmp_path / "server.log", host=None)  # no --host: the service's default
    try:
        deadline = time.time() + 120
        listening = []
        while time.time() < deadline and not listening:
            listening = [c.laddr.ip for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
            time.sleep(0.5)
        assert listening and set(listening) <= {"127.0.0.1"}, listening
    finally:
        server.stop()
