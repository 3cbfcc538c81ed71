"""Moving a running service to another model version (service.control): every worker moves, or
none stays moved; refusals keep the old version serving; no request fails under load."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import gc
import hashlib

import httpx
import pytest
import torch
from safetensors.torch import save as safetensors_save

from model.checkpoint import WEIGHTS_FILE, load_checkpoint, read_manifest, save_checkpoint, write_manifest
from service.core.heap import settle_heap
from service.control.control_dir import ControlDir
from service.control.follower import VersionFollower
from service.control.moves import move_all
from service.core.refusals import Refusal
from testkit.clients import BackgroundClients
from testkit.images import shape_png
from testkit.models import untrained_checkpoint
from testkit.docs import code_block
from testkit.server import ROOT, start_server
from testkit.wait import wait_until

ADMIN_KEY = "change-me"  # the README's
NAME = "cnn-update-test"  # a model name of its own: the other tests serve cnn-classifier:latest


# ----- the coordination, on its own: real control directory, real threads ----------------------


def _follower(control: ControlDir, fails_on: str | None = None) -> VersionFollower:
    def load(tag: str) -> str:
        if tag == fails_on:
            raise RuntimeError("out of memory halfway through loading")
        return tag

    return VersionFollower(control, "model", "v1", load, lambda version: None)


def test_a_worker_that_fails_halfway_sends_every_worker_back(tmp_path):
    """Two workers (threads here, with their own reports): one fails to load v2, so the move is
    refused, the one that had moved goes back, and both end on v1."""
    control = ControlDir(tmp_path)
    good, bad = _follower(control), _follower(control, fails_on="v2")
    bad.pid = 1  # a live process's pid: two workers' reports from one test process
    for follower in (good, bad):
        follower.step()
        follower.control.report(follower._status("serving"))
    stop = threading.Event()

    def follow():
        while not stop.is_set():
            good.step()
            bad.step()
            time.sleep(0.02)

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        result = move_all(control, "v2", "v1", expected_workers=2, timeout_s=10)
    finally:
        stop.set()
        thread.join()
    assert not result.moved and result.reason == "move_refused"
    assert "out of memory halfway" in result.detail and "back on v1" in result.detail
    assert good.tag == bad.tag == "v1"


def test_a_follower_error_is_logged_and_counted_and_the_next_order_still_heard(tmp_path, caplog):
    """An order the follower cannot read (here: not an object) is an error it logs and reports to
    `on_error` (the service counts it in cnn_version_follower_errors_total); the next good order moves it."""
    control = ControlDir(tmp_path)
    follower = _follower(control)
    errors: list[BaseException] = []
    follower.on_error = errors.append
    (tmp_path / "order.json").write_text("[1, 2]")
    with caplog.at_level("ERROR", logger="service.control.follower"):
        follower.poll_once()
    assert [type(err) for err in errors] == [TypeError]
    assert "model version follower" in caplog.text and "TypeError" in caplog.text
    (tmp_path / "order.json").unlink()
    control.publish("v2", "v1")
    follower.poll_once()
    assert follower.tag == "v2" and len(errors) == 1


def test_one_move_at_a_time(tmp_path):
    """The moves' lock is an flock per open file: a second holder in the same process (another
    thread of the worker) is refused as one in another worker would be, and named what is moving."""
    control = ControlDir(tmp_path)
    with control.exclusive_move("name:v2"):
        with pytest.raises(Refusal) as refused:
            with control.exclusive_move("name:v3"):
                pass
        assert refused.value.status == 409 and refused.value.reason == "move_in_progress"
        assert "name:v2" in refused.value.detail
    with control.exclusive_move("name:v3"):  # released when the first move ends
        pass


def test_settling_the_heap_keeps_it_frozen_and_frees_the_old_version():
    """settle_heap after a move, in a process that froze its heap: the old version, frozen with the
    rest and then dropped, is freed (by reference counting; or, held by a cycle, by the full
    collection settle_heap does when it is told the old version is still alive), and what is
    alive afterwards is frozen."""
    class Version:  # a version held by a reference cycle: frozen, only gc.unfreeze() lets it go
        def __init__(self):
            self.me = self

    import weakref

    gc.collect()
    gc.freeze()
    try:
        plain, cyclic = torch.nn.Linear(64, 64), Version()
        gc.freeze()  # both frozen, as a version installed after the last settle is
        plain_ref, cyclic_ref = weakref.ref(plain), weakref.ref(cyclic)
        del plain, cyclic
        assert plain_ref() is None  # reference counting frees a frozen object without a cycle
        assert cyclic_ref() is not None
        assert settle_heap(released=True).startswith("old version freed")
        assert cyclic_ref() is not None  # a young collection does not see frozen objects
        assert settle_heap(released=False).startswith("old version still alive")
        assert cyclic_ref() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_update_gate_judges_the_503s_a_move_causes():
    """`make loadtest-update` counts the 503s of the answers that overlapped a move against the steady
    rate of the rest: none allowed where the steady load got none; where the load alone is refused a
    share (alexnet on 2 cores), the moves may see that share and no more."""
    from loadtests.update import MOVE_TAIL_S, WARMUP_S, excess_503s, split_by_moves

    started, windows = 1000.0, [(1030.0, 1031.0)]
    timeline = [(1001.0, 10.0, "shed"),  # the cold start's
                (1031.0 + MOVE_TAIL_S - 0.05, 100.0, "ok"),  # ended in the move's tail
                (1030.2, 400.0, "ok"),  # began before the move, ended during it
                (1029.9, 50.0, "ok")]  # ended before the move began
    cold, moving, steady = split_by_moves(timeline, windows, started)
    assert cold == timeline[:1] and moving == timeline[1:3] and steady == timeline[3:]
    assert started + WARMUP_S > 1001.0
    calm = [(2000.0 + i, 10.0, "ok") for i in range(1000)]
    assert excess_503s([(1.0, 10.0, "shed")] + calm[:99], calm) == (1, 0.0)  # steady got none: 1 is one too many
    overloaded = calm[:900] + [(3000.0 + i, 10.0, "shed") for i in range(100)]  # 10% refused without any move
    shed, explained = excess_503s(overloaded[:450] + overloaded[900:950], overloaded)  # 500 answers, 10% refused
    assert shed == 50 and explained == pytest.approx(50 + 3 * (500 * 0.1 * 0.9) ** 0.5)
    assert excess_503s(overloaded[:400] + overloaded[900:1000], overloaded)[0] > explained  # 20%: the move's


# ----- served for real ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(tiny_run, run_cli, tmp_path_factory, bentoml_home) -> dict[str, str]:
    """v1 (the tiny run), v2 (its weights changed: other answers), a tampered v3 and an incompatible
    model, registered under a name of their own."""
    def register(directory: Path) -> str:
        return run_cli("training", "register", str(directory), "--name", NAME).stdout.strip().split()[-1]

    root = tmp_path_factory.mktemp("versions")
    checkpoint = load_checkpoint(tiny_run)
    manifest = checkpoint.manifest
    with torch.no_grad():
        checkpoint.model.fc8.weight.mul_(1.5)  # sharper probabilities: v2 answers differently
    save_checkpoint(root / "v2", checkpoint.model, manifest.class_names, manifest.preprocessing, manifest.preset,
                    manifest.training)
    tags = {"v1": register(tiny_run), "v2": register(root / "v2"), "v3": register(root / "v2")}
    stored = bentoml_home / "models" / NAME / tags["v3"].split(":")[1] / "weights.safetensors"
    blob = bytearray(stored.read_bytes())
    blob[-7] ^= 0x5A  # tampered in the store after registration
    stored.write_bytes(bytes(blob))
    tags["incompatible"] = register(untrained_checkpoint("cifar", root / "cifar"))
    tags["v2_dir"] = str(root / "v2")
    # "unfit": intact (every hash matches its manifest) and compatible, but its weights do not fit the
    # network its manifest describes -- it passes the admin call's check (which builds no model) and
    # fails halfway through each worker's load
    tags["unfit"] = register(root / "v2")
    stored = bentoml_home / "models" / NAME / tags["unfit"].split(":")[1]
    tensors = {name: t.contiguous() for name, t in checkpoint.model.state_dict().items()}
    tensors["fc8.weight"] = tensors["fc8.weight"][:-1].clone()  # one class short
    blob = safetensors_save(tensors, metadata={"format": "pt"})
    (stored / WEIGHTS_FILE).write_bytes(blob)
    unfit = read_manifest(stored)
    unfit.weights_sha256 = hashlib.sha256(blob).hexdigest()
    write_manifest(stored, unfit)
    return tags


def _move(url: str, tag: str, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/admin/model", json={"tag": tag}, headers=headers, timeout=300)


class Load(BackgroundClients):
    """Clients sending /classify (several images), /feature_maps and /explain until stopped; every
    answer's status and `model` field kept."""

    def __init__(self, url: str, clients: int = 4):
        super().__init__(url, clients)
        image = base64.b64encode(shape_png(3)).decode()
        self.calls = [("classify", {"images_base64": [image] * 3}), ("feature_maps", {"image_base64": image,
                      "layers": ["conv1"], "format": "stats"}), ("explain", {"image_base64": image})]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = index
            while self.running():
                endpoint, body = self.calls[n % len(self.calls)]
                response = client.post(f"{self.url}/{endpoint}", json=body)
                self.answers.append((endpoint, response.status_code, response.json().get("model")))
                n += 1

    def wait_for(self, count: int, what: str, tag: str | None = None) -> None:
        """Until `count` more answers (by `tag`, if given) have come in from now on."""
        start = len(self.answers)
        wait_until(lambda: sum(1 for a in self.answers[start:] if a[1] == 200 and tag in (None, a[2])) >= count,
                   120, what)


def _wait_for_workers(url: str, count: int) -> None:
    """Ready means one worker answers; wait until every worker has reported what it serves."""
    deadline = time.monotonic() + 120
    while len(httpx.get(f"{url}/model", timeout=30).json()["workers"]) < count:
        assert time.monotonic() < deadline, "not every worker started"
        time.sleep(0.5)


def _served_tags(url: str) -> set[str]:
    return {worker["tag"] for worker in httpx.get(f"{url}/model", timeout=30).json()["workers"]}


@pytest.mark.slow
def test_moves_in_the_split_layout_under_load_fail_no_request(versions, cli_env, tmp_path):
    """The model worker moves; the two API workers follow with the model's shape; each answer names
    the version that computed it. (The single layout: test_update_scenario_behaviour_gates.)"""
    server = start_server(cli_env, tmp_path, MODEL_TAG=versions["v1"], ADMIN_KEY=ADMIN_KEY, LAYOUT="split",
                          API_WORKERS="2")
    try:
        _wait_for_workers(server.url, 3)
        with Load(server.url) as load:
            load.wait_for(8, "load on v1")
            moved = _move(server.url, versions["v2"])
            assert moved.status_code == 200, moved.text
            assert moved.json()["moved"] and {w["tag"] for w in moved.json()["workers"]} == {versions["v2"]}
            load.wait_for(8, "load on v2", versions["v2"])
            tampered = _move(server.url, versions["v3"])
            load.wait_for(8, "load after the tampered version's refusal", versions["v2"])
            back = _move(server.url, versions["v1"])
            load.wait_for(8, "load back on v1", versions["v1"])
        assert tampered.status_code == 422 and tampered.json()["error"] == "checkpoint_invalid", tampered.text
        assert back.status_code == 200, back.text
        assert _served_tags(server.url) == {versions["v1"]}
        failed = [a for a in load.answers if a[1] != 200]
        assert not failed, failed[:5]
        assert {a[2] for a in load.answers} == {versions["v1"], versions["v2"]}  # both answered, nothing else
    finally:
        server.stop()


@pytest.fixture(scope="module")
def admin_server(versions, cli_env, tmp_path_factory):
    """One API worker serving v1, moves allowed with the README's admin key."""
    server = start_server(cli_env, tmp_path_factory.mktemp("admin"), MODEL_TAG=versions["v1"], ADMIN_KEY=ADMIN_KEY,
                          API_WORKERS="1")
    yield server
    server.stop()


@pytest.mark.slow
def test_refusals_keep_the_old_version_and_say_why(versions, admin_server):
    url = admin_server.url
    assert _move(url, versions["v2"], key=None).status_code == 401
    assert _move(url, versions["v2"], key="wrong").status_code == 401
    missing = _move(url, f"{NAME}:doesnotexist")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_version"
    incompatible = _move(url, versions["incompatible"])
    assert incompatible.status_code == 422 and incompatible.json()["error"] == "incompatible_model"
    assert "preprocessing" in incompatible.json()["detail"]
    tampered = _move(url, versions["v3"])
    assert tampered.status_code == 422 and tampered.json()["error"] == "checkpoint_invalid"
    assert "sha256" in tampered.json()["detail"]
    assert _served_tags(url) == {versions["v1"]}
    body = {"images_base64": [base64.b64encode(shape_png(1)).decode()]}
    assert httpx.post(f"{url}/classify", json=body, timeout=30).json()["model"] == versions["v1"]
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'cnn_model_swaps_total{result="refused"} 3.0' in metrics
    assert f'tag="{versions["v1"]}"' in metrics


@pytest.fixture(scope="module")
def two_workers(versions, cli_env, tmp_path_factory):
    """Two API workers (single layout) serving v1, moves allowed."""
    server = start_server(cli_env, tmp_path_factory.mktemp("two"), MODEL_TAG=versions["v1"], ADMIN_KEY=ADMIN_KEY,
                          API_WORKERS="2")
    try:
        _wait_for_workers(server.url, 2)
        yield server
    finally:
        server.stop()


def _generation(url: str) -> int:
    return max(worker["generation"] for worker in httpx.get(f"{url}/model", timeout=30).json()["workers"])


@pytest.mark.slow
def test_a_move_while_another_is_in_progress_is_refused_with_409(versions, two_workers):
    """While a move holds the moves' lock (here the test holds it, as a worker taking an admin call
    does: the same flock on the server's control directory), an admin call is answered 409
    move_in_progress naming the move under way, and publishes no order; once the lock is free the
    same call moves every worker. (Two real calls at once race to the lock; which one wins, or
    whether the first is done before the second arrives on a busy machine, is not the contract.)"""
    import tempfile
    from pathlib import Path

    from service.control.control_dir import ControlDir

    url = two_workers.url
    control = ControlDir(Path(tempfile.gettempdir()) / f"{ControlDir.PREFIX}{two_workers.process.pid}")
    assert (control.path / "order.json").exists() or any(control.path.glob("worker-*.json")), control.path
    before = _generation(url)
    with control.exclusive_move("cnn-classifier:held-by-the-test"):
        refused = _move(url, versions["v2"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "move_in_progress" and "held-by-the-test" in refused.json()["detail"]
    assert _generation(url) == before and _served_tags(url) == {versions["v1"]}
    moved = _move(url, versions["v2"])
    assert moved.status_code == 200, moved.text
    assert _served_tags(url) == {versions["v2"]} and _generation(url) == before + 1
    assert _move(url, versions["v1"]).status_code == 200


@pytest.mark.slow
def test_a_load_that_fails_halfway_in_the_workers_keeps_the_old_version(versions, two_workers):
    """A version whose files are intact but whose weights do not fit its network passes the admin
    call's check (verification only: no model is built there) and fails in each worker's load; the
    call says so (409 move_refused, each worker's reason), every worker stays on v1 and no request
    fails meanwhile."""
    url = two_workers.url
    with Load(url, clients=2) as load:
        time.sleep(0.5)
        refused = _move(url, versions["unfit"])
        time.sleep(0.5)
    assert refused.status_code == 409 and refused.json()["error"] == "move_refused", refused.text
    assert "do not fit the manifest's model config" in refused.json()["detail"]
    assert "back on " + versions["v1"] in refused.json()["detail"]
    assert _served_tags(url) == {versions["v1"]}
    assert load.answers and all(a[1] == 200 and a[2] == versions["v1"] for a in load.answers), load.answers[:5]


@pytest.mark.slow
def test_ten_moves_keep_the_heap_frozen_and_memory_flat(versions, two_workers):
    """After each move every worker freezes its heap again once the old version is freed (as start-up
    freezes it; the worker logs how): at once, though the old version served requests (nothing a
    request started -- the batcher's task, its last batch -- keeps it alive), and ten moves leave
    the workers' memory within 10%."""
    from loadtests.update import workers_rss

    url = two_workers.url
    pids = {worker["pid"] for worker in httpx.get(f"{url}/model", timeout=30).json()["workers"]}
    assert _move(url, versions["v2"]).status_code == 200 and _move(url, versions["v1"]).status_code == 200
    time.sleep(1)
    before = workers_rss(two_workers)["api"]
    body = {"images_base64": [base64.b64encode(shape_png(1)).decode()]}
    for index in range(10):
        for _ in range(4):  # each version answers before it is moved away from (the batcher then held it)
            assert httpx.post(f"{url}/classify", json=body, timeout=30).status_code == 200
        logged = len(two_workers.log())  # a worker may settle before the call answers
        moved = _move(url, versions["v2" if index % 2 == 0 else "v1"])
        assert moved.status_code == 200, moved.text
    deadline = time.monotonic() + 30
    while True:  # each worker settles its heap once the old version is freed (a few hundred ms)
        tail = two_workers.log()[logged:]
        settled = {int(pid) for pid in re.findall(r"\(pid (\d+)\): heap settled after the move \(old version freed",
                                                  tail)}
        if settled >= pids or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert settled >= pids, tail
    assert "old version still alive" not in two_workers.log()  # every old version went with its last request
    after = workers_rss(two_workers)["api"]
    assert after <= 1.10 * before, (before, after)


@pytest.mark.slow
def test_update_scenario_behaviour_gates(tmp_path):
    """`make loadtest-update`'s scenario, single layout, small preset, its behaviour gates: Locust's 16
    users see 0 failed requests while the service moves v1 -> v2 -> v1, refuses a tampered v3 and
    moves 3 more times; only v1 and v2 answer; memory stays within 10%."""
    from loadtests.update import main

    assert main(["--preset", "small", "--layout", "single", "--moves", "3", "--gates", "behaviour",
                 "--reports", str(tmp_path)]) == 0


@pytest.mark.slow
def test_updates_are_off_without_an_admin_key(server):
    refused = httpx.post(f"{server.url}/admin/model", json={"tag": "cnn-classifier:latest"}, timeout=30)
    assert refused.status_code == 403 and refused.json()["error"] == "admin_off"


def readme_update_commands() -> list[str]:
    """The commands of the "Updating the model" block (docs/operations.md), continuation lines joined."""
    block = code_block("bash", "serve-version")
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.slow
def test_the_readmes_update_commands_work(versions, admin_server, cli_env):
    """Each command as the README writes it, with this test's versions and server put in."""
    commands = readme_update_commands()
    assert commands[0] == "ADMIN_KEY=change-me make serve"  # started here as the tests start servers
    server = admin_server

    def run(command: str) -> subprocess.CompletedProcess:
        command = (command.replace("http://127.0.0.1:3000", server.url).replace("python -m", f"{sys.executable} -m")
                   .replace("cnn-classifier:<version>", versions["v2"])
                   .replace("cnn-classifier:<previous>", versions["v1"]).replace("cnn-classifier", NAME))
        return subprocess.run(command, shell=True, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600)

    try:
        publish, move, rollback, watch, curl = commands[1:]
        moved = run(move)
        assert moved.returncode == 0 and f"serving {versions['v2']}" in moved.stdout, moved.stdout + moved.stderr
        assert _served_tags(server.url) == {versions["v2"]}
        assert run(rollback).returncode == 0 and _served_tags(server.url) == {versions["v1"]}
        published = run(publish.replace("python -m training --data shapes --preset small --out runs/v2 && ", "")
                        .replace("runs/v2", versions["v2_dir"]) + f" --name {NAME}")
        new = published.stdout.strip().split()[-1]
        assert published.returncode == 0 and new.startswith(NAME), published.stderr
        followed = run(f"{watch} --moves 1 --interval 0.2")
        assert followed.returncode == 0 and _served_tags(server.url) == {new}, followed.stdout + followed.stderr
        answer = run(curl + " --fail-with-body -sS")
        assert answer.returncode == 0 and '"moved": true' in answer.stdout.replace('"moved":true', '"moved": true')
        assert _served_tags(server.url) == {versions["v2"]}
    finally:
        _move(server.url, versions["v1"])  # as the module's other tests expect it
