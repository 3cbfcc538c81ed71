"""Run a Locust scenario headless and check its SLO gates.

    python -m loadtests run --scenario smoke                      # starts the service itself
    python -m loadtests run --scenario overload
    python -m loadtests run --scenario smoke --host http://127.0.0.1:3000 --duration 60s
    python -m loadtests run --scenario smoke --set min_rps=50      # override a gate
    python -m loadtests run --scenario overload --gates behaviour  # what `make test` checks

Gates come in two kinds (loadtests/slo.toml): behaviour gates, which only a
defect breaks, and speed gates (the scenario's `slo` table), which a slow or
busy machine can breach. `--gates all` (default) checks both.

Reports (Locust CSV + HTML, an outcome summary, the gate results) go under
--reports (default reports/). Exit status 1 names each breached gate.
Targets are loopback only: load is never sent to another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from testkit.locust import locust_command, locust_results
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess, wait_until_ready

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Gate:
    name: str
    limit: float
    measured: float
    passed: bool

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: measured {self.measured:.4g}, limit {self.limit:.4g}"


def load_scenario(path: Path, name: str, overrides: list[str], gates: str = "all") -> dict:
    """The scenario's settings and gates; with gates="all" its speed gates (the
    `slo` table) join the behaviour gates, replacing any of the same name."""
    scenarios = tomllib.loads(path.read_text())
    if name not in scenarios:
        raise SystemExit(f"no scenario {name!r} in {path}; have {sorted(scenarios)}")
    scenario = dict(scenarios[name])
    speed_gates = scenario.pop("slo", {})
    if gates == "all":
        scenario.update(speed_gates)
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            scenario[key] = json.loads(value)
        except json.JSONDecodeError:
            scenario[key] = value
    return scenario


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"refusing to load-test {host!r}: targets must be loopback (127.0.0.0/8, localhost, ::1)")


def start_service(scenario: dict, reports: Path) -> ServerProcess:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    env.update({k: str(v) for k, v in scenario.get("server_env", {}).items()})
    if scenario.get("preset"):
        env["CHECKPOINT_DIR"] = str(untrained_checkpoint(scenario["preset"], reports / "models" / scenario["preset"]))
    server = ServerProcess(env, reports / f"{scenario['_name']}_server.log")
    server.wait_ready(timeout=180)
    return server


def run_locust(scenario: dict, host: str, reports: Path) -> tuple[dict, dict]:
    command, env = locust_command(scenario, host, reports)
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=_seconds(scenario["duration"]) + 120)
    return locust_results(scenario, reports)


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]] if duration[-1] in units else float(duration)


def evaluate_gates(scenario: dict, summary: dict, aggregated: dict, recovered: tuple[int, int] | None) -> list[Gate]:
    endpoints = summary["endpoints"]
    totals = {k: sum(e.get(k, 0) for e in endpoints.values()) for k in ("ok", "shed", "error")}
    requests = max(1, sum(totals.values()))
    gates: list[Gate] = []

    def gate(name, limit, measured, passed):
        gates.append(Gate(name, limit, measured, passed))

    if "max_error_ratio" in scenario:
        gate("max_error_ratio", scenario["max_error_ratio"], totals["error"] / requests,
             totals["error"] / requests <= scenario["max_error_ratio"])
    if "max_shed_ratio" in scenario:
        gate("max_shed_ratio", scenario["max_shed_ratio"], totals["shed"] / requests,
             totals["shed"] / requests <= scenario["max_shed_ratio"])
    if "min_shed_ratio" in scenario:
        gate("min_shed_ratio", scenario["min_shed_ratio"], totals["shed"] / requests,
             totals["shed"] / requests >= scenario["min_shed_ratio"])
    if "measured_capacity_rps" in scenario:
        offered = (totals["ok"] + totals["shed"] + totals["error"]) / summary["seconds"]
        factor = offered / scenario["measured_capacity_rps"]
        gate("offered_load_over_capacity", scenario.get("min_overload_factor", 3.0), factor,
             factor >= scenario.get("min_overload_factor", 3.0))
    if "min_rps" in scenario:
        rps = float(aggregated["Requests/s"])
        gate("min_rps", scenario["min_rps"], rps, rps >= scenario["min_rps"])
    for percentile in ("p95", "p99"):
        for endpoint, limit in scenario.get(f"{percentile}_ms", {}).items():
            measured = endpoints.get(endpoint, {}).get(f"ok_{percentile}_ms")
            if measured is None:
                gate(f"{percentile}_ms[{endpoint}] (no ok requests)", limit, float("nan"), False)
            else:
                gate(f"{percentile}_ms[{endpoint}]", limit, measured, measured <= limit)
    if "max_ok_ms" in scenario:  # hang guard
        slowest = [e["ok_max_ms"] for e in endpoints.values() if e.get("ok")]
        measured = max(slowest) if slowest else float("nan")
        gate("max_ok_ms", scenario["max_ok_ms"], measured, bool(slowest) and measured <= scenario["max_ok_ms"])
    if "shed_p50_margin_ms" in scenario:  # refused at the door, within the line's wait
        limit = float(scenario["server_env"]["ADMISSION_WAIT_MS"]) + scenario["shed_p50_margin_ms"]
        sheds = [e["shed_p50_ms"] for e in endpoints.values() if e.get("shed")]
        measured = max(sheds) if sheds else float("nan")
        gate("shed_p50_ms_within_wait", limit, measured, bool(sheds) and measured <= limit)
    if "max_shed_p50_over_ok_p50" in scenario:
        ratios = [e["shed_p50_ms"] / e["ok_p50_ms"] for e in endpoints.values() if e.get("shed") and e.get("ok")]
        measured = max(ratios) if ratios else float("nan")
        gate("max_shed_p50_over_ok_p50", scenario["max_shed_p50_over_ok_p50"], measured,
             bool(ratios) and measured <= scenario["max_shed_p50_over_ok_p50"])
    if "max_shed_p95_ms" in scenario:
        sheds = [e["shed_p95_ms"] for e in endpoints.values() if e.get("shed")]
        measured = max(sheds) if sheds else 0.0
        gate("max_shed_p95_ms", scenario["max_shed_p95_ms"], measured, measured <= scenario["max_shed_p95_ms"])
    if "ok_p99_ms_over_budget" in scenario:
        budget = float(scenario["server_env"]["MAX_LATENCY_MS"])
        limit = scenario["ok_p99_ms_over_budget"] * budget
        oks = [e["ok_p99_ms"] for e in endpoints.values() if e.get("ok")]
        measured = max(oks) if oks else float("nan")
        gate("ok_p99_ms", limit, measured, bool(oks) and measured <= limit)
    if recovered is not None:
        succeeded, tried = recovered
        gate("recovery_requests_ok", tried, succeeded, succeeded == tried)
    return gates


def calibrate(scenario: dict, host: str, reports: Path) -> float:
    """Capacity in requests/s: closed-loop clients with no pause that honour Retry-After.

    Clients that retried a 503 at once would turn the first refusal into a
    storm of refusals that eats the CPU the model needs (seen here: 99% shed
    by 8 such clients), and the calibration would measure the storm."""
    probe = {**scenario, "_name": f"{scenario['_name']}_calibration", "users": scenario["calibrate_users"],
             "spawn_rate": scenario["calibrate_users"], "duration": scenario["calibrate_duration"], "wait": "0,0",
             "honor_retry_after": True}
    probe.pop("throughput_per_user", None)
    summary, _ = run_locust(probe, host, reports)
    ok = sum(e.get("ok", 0) for e in summary["endpoints"].values())
    return ok / summary["seconds"]


def recovery_check(host: str, count: int) -> tuple[int, int]:
    """After the load: wait for /readyz, then `count` sequential requests must all succeed."""
    from testkit.images import shapes

    wait_until_ready(host, timeout=30)
    image = shapes(1)[0]
    succeeded = 0
    for _ in range(count):
        response = httpx.post(f"{host}/classify", files=[("images", (image.name, image.data, image.content_type))],
                              timeout=30)
        succeeded += response.status_code == 200
    return succeeded, count


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.slo, args.scenario, args.set or [], args.gates)
    scenario["_name"] = args.scenario
    for key in ("users", "spawn_rate", "duration"):
        if getattr(args, key) is not None:
            scenario[key] = getattr(args, key)
    reports = args.reports
    reports.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        server = start_service(scenario, reports)
        host = server.url
    check_loopback(host)
    try:
        if "overload_factor" in scenario:
            capacity = calibrate(scenario, host, reports)
            scenario["measured_capacity_rps"] = capacity
            scenario["throughput_per_user"] = scenario["overload_factor"] * capacity / scenario["users"]
            print(f"capacity {capacity:.1f} req/s; offering {scenario['overload_factor']}x = "
                  f"{scenario['overload_factor'] * capacity:.1f} req/s from {scenario['users']} users", flush=True)
        print(f"{args.scenario}: {scenario['users']} users for {scenario['duration']} against {host}", flush=True)
        summary, aggregated = run_locust(scenario, host, reports)
        recovered = recovery_check(host, int(scenario["recovery_requests"])) if "recovery_requests" in scenario else None
    finally:
        if server is not None:
            server.stop()
    gates = evaluate_gates(scenario, summary, aggregated, recovered)
    (reports / f"{args.scenario}_gates.json").write_text(json.dumps([g.__dict__ for g in gates], indent=2))
    print(f"{aggregated['Request Count']} requests, {float(aggregated['Requests/s']):.1f} req/s")
    for name, endpoint in sorted(summary["endpoints"].items()):
        print(f"  {name:22s} ok {endpoint.get('ok', 0):5d} (p95 {endpoint.get('ok_p95_ms', 0):7.1f} ms)  "
              f"shed {endpoint.get('shed', 0):5d}  error {endpoint.get('error', 0):4d}")
    for g in gates:
        print(g.line())
    failed = [g.name for g in gates if not g.passed]
    if failed:
        print(f"SLO breached: {', '.join(failed)}")
        return 1
    print(f"all {len(gates)} gates passed; reports in {reports}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run", help="run a scenario and check its SLO gates")
    runner.add_argument("--scenario", default="smoke")
    runner.add_argument("--host", help="a running service (loopback); default: start one")
    runner.add_argument("--users", type=int)
    runner.add_argument("--spawn-rate", dest="spawn_rate", type=float)
    runner.add_argument("--duration", help="e.g. 30s, 2m")
    runner.add_argument("--slo", type=Path, default=ROOT / "loadtests" / "slo.toml")
    runner.add_argument("--reports", type=Path, default=ROOT / "reports")
    runner.add_argument("--set", action="append", help="override a scenario value: key=value (JSON)")
    runner.add_argument("--gates", choices=("all", "behaviour"), default="all",
                        help="behaviour: only the gates a defect breaks (make test); all: speed gates too")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
