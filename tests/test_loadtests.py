"""Load tests through their real command: Locust headless against the real service, SLO gates."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_smoke_scenario_passes_its_gates(server, run_cli, tmp_path):
    result = run_cli("loadtests", "run", "--scenario", "smoke", "--host", server.url, "--duration", "30s",
                     "--reports", str(tmp_path), timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "gates passed" in result.stdout
    gates = json.loads((tmp_path / "smoke_gates.json").read_text())
    assert gates and all(g["passed"] for g in gates)
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    # every user class and request form was exercised, and every answer checked
    assert {"classify:multipart", "classify:json", "embed", "feature_maps:png"} <= set(summary["endpoints"])
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
    """About 4x capacity: fast 503s with Retry-After, accepted requests within budget, recovery after."""
    result = run_cli("loadtests", "run", "--scenario", "overload", "--duration", "20s", "--reports", str(tmp_path),
                     timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    gates = {g["name"]: g for g in json.loads((tmp_path / "overload_gates.json").read_text())}
    assert gates["min_shed_ratio"]["passed"] and gates["max_shed_p95_ms"]["passed"]
    assert gates["recovery_requests_ok"]["measured"] == 20
