"""Load tests through their real command: Locust headless against the real service.

These check behaviour (`--gates behaviour`): no errors, fast refusals relative
to accepted work, no hang, recovery. Speed gates (p95/p99 in milliseconds,
requests/s) live in `make loadtest` / `make loadtest-overload`: a slow or busy
machine may breach those, and `make test` must pass on one."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_smoke_scenario_passes_its_gates(server, run_cli, tmp_path):
    result = run_cli("loadtests", "run", "--scenario", "smoke", "--host", server.url, "--duration", "30s",
                     "--gates", "behaviour", "--reports", str(tmp_path), timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "gates passed" in result.stdout
    gates = {g["name"]: g for g in json.loads((tmp_path / "smoke_gates.json").read_text())}
    assert {"max_error_ratio", "max_ok_ms"} <= set(gates) and all(g["passed"] for g in gates.values())
    assert not any(name.startswith(("p95", "p99", "min_rps")) for name in gates), "speed gates belong to make loadtest"
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    # every user class and request form was exercised, and every answer checked
    assert {"classify:multipart", "classify:json", "embed", "feature_maps:png", "explain:guided_backprop"} \
        <= set(summary["endpoints"])
    assert (tmp_path / "smoke.html").stat().st_size > 1000 and (tmp_path / "smoke_stats.csv").exists()


def test_breached_gate_fails_and_is_named(server, run_cli, tmp_path):
    result = run_cli("loadtests", "run", "--scenario", "smoke", "--host", server.url, "--duration", "5s",
                     "--set", "min_rps=100000", "--reports", str(tmp_path), timeout=300, check=False)
    assert result.returncode == 1
    assert "FAIL  min_rps" in result.stdout and "SLO breached: min_rps" in result.stdout


def test_only_loopback_targets(run_cli, tmp_path):
    result = run_cli("loadtests", "run", "--scenario", "smoke", "--host", "http://10.1.2.3:3000",
                     "--reports", str(tmp_path), timeout=60, check=False)
    assert result.returncode != 0 and "must be loopback" in result.stderr


def test_overload_sheds_fast_and_recovers(run_cli, tmp_path):
    """About 4x capacity: 503s with Retry-After for the excess, refused within the line's wait at the
    door (plus a margin no busy machine outruns), no errors or time-outs, nothing hangs, and every
    request succeeds right after."""
    result = run_cli("loadtests", "run", "--scenario", "overload", "--duration", "20s", "--gates", "behaviour",
                     "--reports", str(tmp_path), timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    gates = {g["name"]: g for g in json.loads((tmp_path / "overload_gates.json").read_text())}
    assert {"max_error_ratio", "min_shed_ratio", "shed_p50_ms_within_wait", "max_ok_ms",
            "offered_load_over_capacity"} <= set(gates)
    assert gates["shed_p50_ms_within_wait"]["limit"] == 45 + 1000
    assert all(g["passed"] for g in gates.values())
    assert gates["recovery_requests_ok"]["measured"] == 20
    # speed: make loadtest-overload
    assert {"ok_p99_ms", "max_shed_p95_ms", "max_shed_p50_over_ok_p50"}.isdisjoint(gates)


def test_speed_gates_are_kept_for_make_loadtest():
    """The tight figures did not vanish: `--gates all` (what make loadtest-overload runs) still has them."""
    from loadtests.__main__ import load_scenario
    from testkit.server import ROOT

    full = load_scenario(ROOT / "loadtests" / "slo.toml", "overload", [], "all")
    behaviour = load_scenario(ROOT / "loadtests" / "slo.toml", "overload", [], "behaviour")
    assert full["ok_p99_ms_over_budget"] == 1.5 and full["max_shed_p95_ms"] == 100
    assert full["max_shed_p50_over_ok_p50"] == 0.33
    assert "ok_p99_ms_over_budget" not in behaviour and behaviour["max_ok_ms"] == 10000
    assert "max_shed_p50_over_ok_p50" not in behaviour and behaviour["shed_p50_margin_ms"] == 1000


def test_bentoml_peer_serves_a_multipart_batch(cli_env, tmp_path):
    """`make bench`'s BentoML peer (loadtests/bentoml_peer) starts with `bentoml serve` and answers a
    multipart request of two images, as the benchmark sends them, with the top 5 of each."""
    import httpx

    from loadtests.bentoml_peer import PeerServer
    from testkit.images import shape_png

    server = PeerServer(cli_env, tmp_path / "peer.log")
    try:
        server.wait_ready(timeout=120)
        files = [("images", (f"shape_{i}.png", shape_png(i), "image/png")) for i in range(2)]
        response = httpx.post(f"{server.url}/classify", files=files, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text[:2000]
    answers = response.json()
    assert len(answers) == 2
    for top in answers:
        assert len(top) == 5 and all(0 <= c["index"] < 1000 and isinstance(c["label"], str) for c in top)
        probabilities = [c["probability"] for c in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001


def _peer_pixels_and_expected(checkpoint):
    """Pixels as the OIP UINT8 input carries them, and the service's own fp32 answer for them."""
    import numpy as np
    import torch

    from model.checkpoint import load_checkpoint
    from model.inference import Predictor

    size = load_checkpoint(checkpoint).manifest.preprocessing.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    served = Predictor(load_checkpoint(checkpoint), torch.device("cpu"), "fp32")
    return pixels, served.predict(torch.from_numpy(pixels).permute(0, 3, 1, 2)).probabilities


def test_triton_peer_network_computes_what_the_service_serves(tmp_path):
    """The Triton peer's network (loadtests.triton_peer.PeerNetwork, what `make bench-peers` exports to
    ONNX): the OIP `pixels` in, the service's normalization, the network in fp32, the top 5 out -- the
    service's own fp32 probabilities for those classes (its copy folds the normalization into conv1)."""
    import torch

    from loadtests.triton_peer import PeerNetwork
    from model.checkpoint import load_checkpoint
    from testkit.models import untrained_checkpoint

    checkpoint = untrained_checkpoint("small", tmp_path / "small")
    pixels, probabilities = _peer_pixels_and_expected(checkpoint)
    loaded = load_checkpoint(checkpoint)
    with torch.inference_mode():
        scores, indices = PeerNetwork(loaded.model, loaded.manifest.preprocessing).eval()(torch.from_numpy(pixels))
    torch.testing.assert_close(scores, probabilities.topk(5, dim=1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probabilities.gather(1, indices), scores, rtol=1e-4, atol=1e-6)


def test_triton_peer_onnx_export_runs_in_onnxruntime(tmp_path):
    """Where `make bench-peers` built the peer's environments: the exported graph, run by onnxruntime
    in the Triton peer's Python as its inference callable runs it, gives the same top 5."""
    import subprocess

    import numpy as np
    import torch

    from loadtests import triton_peer
    from testkit.models import untrained_checkpoint

    if not (triton_peer.ONNX_PACKAGES / "onnx").is_dir():
        pytest.skip(f"no `onnx` for the export in {triton_peer.ONNX_PACKAGES} (`make bench-peers` installs it)")
    if not triton_peer.PYTHON.exists() or subprocess.run([str(triton_peer.PYTHON), "-c", "import onnxruntime"],
                                                         capture_output=True, check=False).returncode:
        pytest.skip("no Triton peer environment with onnxruntime (`make bench-peers` builds it)")
    checkpoint = untrained_checkpoint("small", tmp_path / "small")
    exported = triton_peer.ensure_onnx(checkpoint, tmp_path / "reports")
    assert not isinstance(exported, str), exported
    path, meta = exported
    assert meta["input_size"] == 64 and len(meta["classes"]) == 10 and meta["dtype"] == "float32"
    pixels, probabilities = _peer_pixels_and_expected(checkpoint)
    np.save(tmp_path / "pixels.npy", pixels)
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "scores, indices = s.run(['top_k_scores', 'top_k_indices'], {'pixels': np.load(sys.argv[2])})\n"
              "np.save(sys.argv[3], scores); np.save(sys.argv[4], indices)\n")
    outs = [tmp_path / "scores.npy", tmp_path / "indices.npy"]
    done = subprocess.run([str(triton_peer.PYTHON), "-c", script, str(path), str(tmp_path / "pixels.npy"),
                           *map(str, outs)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    scores, indices = (torch.from_numpy(np.load(out)) for out in outs)
    torch.testing.assert_close(scores, probabilities.topk(5, dim=1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probabilities.gather(1, indices), scores, rtol=1e-4, atol=1e-6)


def test_the_observing_cost_benchmark_runs(run_cli):
    """`python -m loadtests.observe_cost` (BENCHMARKS.md, "Traces"), briefly: it runs and reports; its
    figure is the benchmark's, not this test's."""
    result = run_cli("loadtests.observe_cost", "--requests", "200", timeout=120)
    assert "median cost of observing a request" in result.stdout
    assert result.stdout.count("observed") == 3
