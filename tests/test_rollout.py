"""Safe rollouts (service.control.rollout), served for real under load: shadow never changes an answer,
agreement is measured right and a disagreeing candidate rolls back by itself, the canary's share is as
asked and sticky per client, a good candidate is promoted through every stage with no failed request;
in both layouts."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys

import httpx
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from testkit.clients import BackgroundClients
from testkit.docs import code_block
from testkit.images import shape_png
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, start_server
from testkit.wait import wait_until

ADMIN_KEY = "change-me"
NAME = "cnn-rollout-test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
IMAGES = [base64.b64encode(shape_png(i % 12, size=64 + 4 * i)).decode() for i in range(12)]


@pytest.fixture(scope="module")
def candidates(tiny_run, cli_env, tmp_path_factory, bentoml_home) -> dict[str, str]:
    """served (the tiny run); same (its weights again, another version); shuffled (fc8's rows permuted:
    each class scored by another's weights); tampered; incompatible."""
    def register(*directories) -> list[str]:  # in one process: five CLI starts would take 20 s
        code = "import sys; from model.store import register; [print(register(d, sys.argv[1])) for d in sys.argv[2:]]"
        return subprocess.run([sys.executable, "-c", code, NAME, *map(str, directories)], cwd=ROOT, env=cli_env,
                              capture_output=True, text=True, check=True).stdout.split()

    root = tmp_path_factory.mktemp("candidates")
    checkpoint = load_checkpoint(tiny_run)
    manifest = checkpoint.manifest
    order = torch.roll(torch.arange(manifest.model_config.num_classes), 1)
    with torch.no_grad():
        checkpoint.model.fc8.weight.copy_(checkpoint.model.fc8.weight[order])
        checkpoint.model.fc8.bias.copy_(checkpoint.model.fc8.bias[order])
    save_checkpoint(root / "shuffled", checkpoint.model, manifest.class_names, manifest.preprocessing,
                    manifest.preset, manifest.training)
    cifar = untrained_checkpoint("cifar", root / "cifar")
    tags = dict(zip(("served", "same", "shuffled", "tampered", "incompatible"),
                    register(tiny_run, tiny_run, root / "shuffled", tiny_run, cifar)))
    assert len(set(tags.values())) == 5, tags
    stored = bentoml_home / "models" / NAME / tags["tampered"].split(":")[1] / "weights.safetensors"
    blob = bytearray(stored.read_bytes())
    blob[-7] ^= 0x5A
    stored.write_bytes(bytes(blob))
    return tags


@pytest.fixture(scope="module")
def rollout_server(candidates, cli_env, tmp_path_factory):
    """Two API workers (the single layout) serving `served`, with the admin key."""
    server = start_server(cli_env, tmp_path_factory.mktemp("rollout"), MODEL_TAG=candidates["served"],
                          ADMIN_KEY=ADMIN_KEY, API_WORKERS="2")
    try:
        wait_until(lambda: len(httpx.get(f"{server.url}/model", timeout=30).json()["workers"]) >= 2, 120,
                   "both workers reporting")
        yield server
    finally:
        server.stop()


def _start(url: str, tag: str, mode: str, share: float, promote: bool = False, **gates) -> httpx.Response:
    body = {"candidate": tag, "mode": mode, "share": share, "gates": gates, "promote": promote}
    return httpx.post(f"{url}/admin/rollout", json=body, headers=ADMIN, timeout=300)


def _state(url: str) -> dict:
    return httpx.get(f"{url}/admin/rollout", headers=ADMIN, timeout=30).json()


def _stop(url: str) -> dict:
    return httpx.delete(f"{url}/admin/rollout", headers=ADMIN, timeout=60).json()


def _classify(client: httpx.Client, url: str, image: str, client_id: str | None = None) -> httpx.Response:
    headers = {"X-Client-Id": client_id} if client_id else {}
    return client.post(f"{url}/classify", json={"images_base64": [image], "top_k": 3}, headers=headers)


class Load(BackgroundClients):
    """Clients sending /classify, each request as one of 64 client ids, until stopped; every answer kept."""

    def _client(self, index: int) -> None:
        chooser = random.Random(index)
        with httpx.Client(timeout=60) as client:
            while self.running():
                response = _classify(client, self.url, chooser.choice(IMAGES), f"client-{chooser.randrange(64)}")
                self.answers.append((response.status_code, response.json().get("model")))


def test_a_missing_tampered_or_incompatible_candidate_is_refused_before_anything_changes(candidates, rollout_server):
    url = rollout_server.url
    assert httpx.post(f"{url}/admin/rollout", json={}, timeout=30).status_code == 401  # the admin key
    missing = _start(url, f"{NAME}:doesnotexist", "shadow", 0.1)
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_version", missing.text
    tampered = _start(url, candidates["tampered"], "shadow", 0.1)
    assert tampered.status_code == 422 and tampered.json()["error"] == "checkpoint_invalid", tampered.text
    incompatible = _start(url, candidates["incompatible"], "canary", 0.1)
    assert incompatible.status_code == 422 and incompatible.json()["error"] == "incompatible_model"
    bad = _start(url, candidates["same"], "sideways", 0.1)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    assert _state(url) == {"state": "none"}  # nothing was written
    with httpx.Client(timeout=60) as client:
        assert _classify(client, url, IMAGES[0]).json()["model"] == candidates["served"]


def test_shadow_never_changes_answers_and_agrees_fully_with_the_same_weights(candidates, rollout_server):
    url = rollout_server.url
    with httpx.Client(timeout=60) as client:
        alone = [_classify(client, url, image).json() for image in IMAGES]
        started = _start(url, candidates["same"], "shadow", 1.0, min_requests=24)
        assert started.status_code == 200, started.text
        assert {w["state"] for w in started.json()["workers"]} == {"ready"} and len(started.json()["workers"]) == 2
        shadowed = [_classify(client, url, image).json() for _ in range(3) for image in IMAGES]
    for index, answer in enumerate(shadowed):
        expected = alone[index % len(IMAGES)]
        assert answer["model"] == candidates["served"]
        assert [p["label"] for p in answer["predictions"][0]["top_k"]] == \
               [p["label"] for p in expected["predictions"][0]["top_k"]]
        assert [p["probability"] for p in answer["predictions"][0]["top_k"]] == \
               pytest.approx([p["probability"] for p in expected["predictions"][0]["top_k"]], abs=1e-6)
    state = wait_until(lambda: (s := _state(url))["state"] == "passed" and s, 60, "the shadow stage passing")
    assert state["numbers"]["compared"] >= 24 and state["numbers"]["agreement"] == 1.0
    assert state["numbers"]["mean_shift"] < 1e-3
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'cnn_rollout_shadow_images_total{candidate="%s",outcome="agreed"' % candidates["same"] in metrics
    stopped = _stop(url)
    assert stopped["state"] == "rolled_back" and stopped["reason"] == "stopped by the operator"


def test_a_candidate_that_disagrees_is_rolled_back_by_itself_with_its_reason(candidates, rollout_server, cli_env):
    url = rollout_server.url
    with Load(url) as load:
        wait_until(lambda: len(load.answers) >= 8, 60, "load")
        command = [sys.executable, "-m", "training", "rollout", candidates["shuffled"], "--shadow", "100%",
                   "--canary", "50%", "--gates", "min_requests=40,min_agreement=0.9", "--url", url,
                   "--admin-key", ADMIN_KEY, "--poll", "0.2"]
        result = subprocess.run(command, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    state = _state(url)
    assert state["state"] == "rolled_back" and state["stage"] == 1  # never reached the canary
    assert "min_agreement" in state["reason"] and "min_agreement" in result.stderr
    assert state["numbers"]["agreement"] < 0.9 and state["numbers"]["compared"] >= 40
    assert [a for a in load.answers if a[0] != 200] == []
    assert {a[1] for a in load.answers} == {candidates["served"]}  # shadow: never the candidate's answer
    def share_back_to_zero():
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        shares = [line for line in metrics.splitlines()
                  if line.startswith("cnn_rollout_share{") and candidates["shuffled"] in line]
        return shares and all(line.endswith(" 0.0") for line in shares) and metrics

    metrics = wait_until(share_back_to_zero, 30, "every worker dropping the candidate")
    assert 'cnn_rollout_decisions_total{decision="rolled_back"} 1.0' in metrics


def test_the_canary_share_is_as_asked_and_sticky_per_client(candidates, rollout_server):
    url, share, clients = rollout_server.url, 0.3, 300
    started = _start(url, candidates["same"], "canary", share, min_requests=10**6)  # stays running
    assert started.status_code == 200, started.text
    try:
        with httpx.Client(timeout=60) as client:
            first = {f"c{i}": _classify(client, url, IMAGES[i % 12], f"c{i}").json()["model"] for i in range(clients)}
            again = {f"c{i}": _classify(client, url, IMAGES[0], f"c{i}").json()["model"] for i in range(0, clients, 5)}
        move = httpx.post(f"{url}/admin/model", json={"tag": candidates["same"]}, headers=ADMIN, timeout=60)
        assert move.status_code == 409 and move.json()["error"] == "rollout_in_progress"  # no move under a rollout
    finally:
        _stop(url)
    on_candidate = sum(model == candidates["same"] for model in first.values())
    assert set(first.values()) <= {candidates["served"], candidates["same"]}
    mean, sd = clients * share, (clients * share * (1 - share)) ** 0.5
    assert abs(on_candidate - mean) <= 4 * sd, on_candidate  # binomial: 4 standard deviations
    assert all(first[c] == model for c, model in again.items())  # sticky


def test_the_docs_curl_lines_start_show_and_stop_a_rollout(candidates, rollout_server):
    """The curl block of docs/operations.md, "Rollouts", as written (the tag and the address swapped in)."""
    block = code_block("bash", "/admin/rollout").replace("\\\n", " ")
    lines = [line.replace("cnn-classifier:<version>", candidates["same"]).replace("http://127.0.0.1:3000",
                                                                                 rollout_server.url)
             for line in block.splitlines() if line.strip() and not line.startswith("#")]
    lines = [line.split(" #")[0] for line in lines]
    assert len(lines) == 3
    outputs = [subprocess.run(["bash", "-c", line.replace("curl ", "curl -s ", 1)], capture_output=True, text=True,
                              timeout=300, check=True).stdout for line in lines]
    started, shown, stopped = (json.loads(out) for out in outputs)
    assert started["state"] == "running" and started["mode"] == "shadow" and started["candidate"] == candidates["same"]
    assert shown["gates"][0]["gate"] == "min_requests" and shown["gates"][0]["limit"] == 200
    assert stopped["state"] == "rolled_back" and stopped["reason"] == "stopped by the operator"


def test_a_good_candidate_is_promoted_through_shadow_and_canary_with_no_failed_request(candidates, rollout_server,
                                                                                       cli_env):
    """Last in this module: the server serves the candidate afterwards. (The p99 gate is held wide open:
    on a busy machine a few dozen latencies are noise; tests/unit/test_rollout.py tests the gate.)"""
    url = rollout_server.url
    with Load(url) as load:
        wait_until(lambda: len(load.answers) >= 8, 60, "load")
        command = [sys.executable, "-m", "training", "rollout", candidates["same"], "--shadow", "50%",
                   "--canary", "25%,100%", "--gates", "min_requests=20,max_p99_ratio=1000", "--url", url,
                   "--admin-key", ADMIN_KEY,
                   "--poll", "0.2"]
        result = subprocess.run(command, cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
        after = len(load.answers)
        wait_until(lambda: len(load.answers) >= after + 8, 60, "load after the promotion")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stage 3 canary 100%" in result.stdout and "promoted" in result.stdout
    assert [a for a in load.answers if a[0] != 200] == []
    assert {a[1] for a in load.answers[after:]} == {candidates["same"]}
    assert {w["tag"] for w in httpx.get(f"{url}/model", timeout=30).json()["workers"]} == {candidates["same"]}
    assert _state(url)["state"] == "promoted"


def test_in_the_split_layout_the_model_worker_computes_the_candidate(candidates, split_server):
    url = split_server.url
    served = httpx.get(f"{url}/model", timeout=30).json()["tag"]
    started = _start(url, candidates["same"], "shadow", 1.0, min_requests=12)
    assert started.status_code == 200, started.text
    assert len(started.json()["workers"]) == 3  # two API workers and the model worker hold it
    try:
        with httpx.Client(timeout=60) as client:
            shadowed = [_classify(client, url, image).json()["model"] for image in IMAGES * 2]
            state = wait_until(lambda: (s := _state(url))["state"] == "passed" and s, 60, "the shadow stage passing")
            assert state["numbers"]["agreement"] == 1.0
            canary = _start(url, candidates["same"], "canary", 1.0, min_requests=10**6)
            assert canary.status_code == 200 and canary.json()["stage"] == 2, canary.text
            on_canary = [_classify(client, url, image, "anyone").json()["model"] for image in IMAGES]
    finally:
        _stop(url)
    with httpx.Client(timeout=60) as client:
        after = [_classify(client, url, image, "anyone").json()["model"] for image in IMAGES]
    assert set(shadowed) == {served}
    assert set(on_canary) == {candidates["same"]}  # computed by the model worker's candidate, and named
    assert set(after) == {served}
