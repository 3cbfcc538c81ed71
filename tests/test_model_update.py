"""Moving a running service to another model version (service.versions): every worker moves, or
none stays moved; refusals keep the old version serving; no request fails under load."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from service.versions import ControlDir, VersionFollower, move_all
from testkit.images import shape_png
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, start_server

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
    return tags


def _move(url: str, tag: str, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/admin/model", json={"tag": tag}, headers=headers, timeout=300)


class Load:
    """Clients sending /classify (several images), /feature_maps and /explain until stopped; every
    answer's status and `model` field kept."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.answers, self._stop = url, [], threading.Event()
        image = base64.b64encode(shape_png(3)).decode()
        self.calls = [("classify", {"images_base64": [image] * 3}), ("feature_maps", {"image_base64": image,
                      "layers": ["conv1"], "format": "stats"}), ("explain", {"image_base64": image})]
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = index
            while not self._stop.is_set():
                endpoint, body = self.calls[n % len(self.calls)]
                response = client.post(f"{self.url}/{endpoint}", json=body)
                self.answers.append((endpoint, response.status_code, response.json().get("model")))
                n += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()


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
            time.sleep(1)
            moved = _move(server.url, versions["v2"])
            assert moved.status_code == 200, moved.text
            assert moved.json()["moved"] and {w["tag"] for w in moved.json()["workers"]} == {versions["v2"]}
            time.sleep(1)
            tampered = _move(server.url, versions["v3"])
            time.sleep(1)
            back = _move(server.url, versions["v1"])
            time.sleep(1)
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
    """The commands of the README's "Updating the model" block, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "serve-version" in b]
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
