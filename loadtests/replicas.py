"""Replicas on one machine, for real: throughput with 1..N replicas, then a rolling replacement
and a SIGKILL under Locust load, then the dashboard's and the alerts' sums against the replicas'
own counters (testkit.replicas says how each step is done).

    python -m loadtests.replicas                        # make replicas: 3 replicas, the default model
    python -m loadtests.replicas --replicas 2 --duration 15s --checkpoint runs/default

Each replica is `bentoml serve` with one API worker (API_WORKERS=1, TORCH_THREADS=1), as one
small pod. Reports (Locust CSV + HTML, haproxy's and Prometheus' logs, replicas.json) go under
--reports. Exit status 1 names every check that failed. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from testkit.replicas import Fleet, Load, requests_all_succeed
from testkit.server import ROOT

REPLICA_ENV = {"API_WORKERS": "1", "TORCH_THREADS": "1"}
INFERENCE_ONLY = "inference=1,inspector=0,embedding=0,attribution=0"


def throughput(fleet: Fleet, counts: list[int], users: int, duration: str, reports: Path) -> list[dict]:
    """Closed-loop /classify clients (no pause): first straight to one replica (what the balancer
    costs), then through the balancer with 1, 2, ... replicas serving. With the machine's CPU use
    meanwhile: how busy its cores were, and the replicas' share (their whole process trees)."""
    rows = []
    slots = list(fleet.servers)
    fleet.serve_only(slots[:1])
    rows.append({"replicas": 1, "through": "direct",
                 **_closed_loop(fleet, fleet.servers[slots[0]].url, "direct", users, duration, reports)})
    for count in counts:
        fleet.serve_only(slots[:count])
        before = {slot: int(row["stot"]) for slot, row in fleet.balancer.stats().items()}
        row = _closed_loop(fleet, fleet.balancer.url, str(count), users, duration, reports)
        after = fleet.balancer.stats()
        rows.append({"replicas": count, "through": "haproxy", **row,
                     "per_replica": {slot: int(after[slot]["stot"]) - before[slot] for slot in slots[:count]}})
    fleet.serve_only(slots)
    return rows


def _closed_loop(fleet: Fleet, host: str, name: str, users: int, duration: str, reports: Path) -> dict:
    from loadtests.__main__ import run_locust
    from testkit.locust import locust_results

    scenario = {"_name": f"replicas_throughput_{name}", "users": users, "spawn_rate": users,
                "duration": duration, "wait": "0,0", "weights": INFERENCE_ONLY}
    cpu_before, replicas_before = psutil.cpu_times(), _replica_cpu_seconds(fleet)
    run_locust(scenario, host, reports)
    cpu_after, replicas_after = psutil.cpu_times(), _replica_cpu_seconds(fleet)
    summary, _ = locust_results(scenario, reports)
    totals = {k: sum(e.get(k, 0) for e in summary["endpoints"].values()) for k in ("ok", "shed", "error")}
    busy = sum(cpu_after) - cpu_after.idle - (sum(cpu_before) - cpu_before.idle)
    elapsed = sum(cpu_after) - sum(cpu_before)  # core-seconds that passed
    return {"ok_rps": totals["ok"] / summary["seconds"], **totals, "cores_busy": psutil.cpu_count() * busy / elapsed,
            "replicas_cores": psutil.cpu_count() * (replicas_after - replicas_before) / elapsed}


def _replica_cpu_seconds(fleet: Fleet) -> float:
    total = 0.0
    for server in fleet.servers.values():
        supervisor = psutil.Process(server.process.pid)
        for process in (supervisor, *supervisor.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def rehearse_rollout(fleet: Fleet, users: int, reports: Path) -> dict:
    load = Load(fleet.balancer.url, reports, "replicas_rollout", users)
    began = time.time()
    try:
        time.sleep(3)  # every user running
        rolls = [vars(fleet.roll(slot)) for slot in list(fleet.servers)]
        time.sleep(2)
    finally:
        outcome = load.stop()
    failed = fleet.failed_since(began)
    return {"load": _brief(outcome), "rolls": rolls, "balancer_failures": [vars(r) for r in failed],
            "problems": [f"{outcome['error']} errors, {outcome['shed']} shed during the rollout"]
            if outcome["error"] or outcome["shed"] or failed else []}


def rehearse_kill(fleet: Fleet, users: int, reports: Path) -> dict:
    load = Load(fleet.balancer.url, reports, "replicas_kill", users)
    try:
        time.sleep(3)
        kill = fleet.kill(next(iter(fleet.servers)))
        time.sleep(3)  # load on the restored replica too
    finally:
        outcome = load.stop()
    problems = kill.problems(outcome["error"])
    if not requests_all_succeed(fleet.balancer.url, 10):
        problems.append("requests after the restart failed")
    return {"load": _brief(outcome), "kill": {**vars(kill), "failed": [vars(r) for r in kill.failed]},
            "problems": problems}


def aggregation(fleet: Fleet) -> dict:
    report = fleet.aggregation()
    problems = list(report.mismatches)
    if report.nonzero == 0:
        problems.append("no counter carried traffic: nothing was compared")
    return {"groups_compared": report.compared, "with_traffic": report.nonzero, "problems": problems}


def _brief(outcome: dict) -> dict:
    return {k: outcome[k] for k in ("ok", "shed", "error", "requests", "seconds", "rps")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.replicas", description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=8, help="closed-loop clients of the throughput runs")
    parser.add_argument("--duration", default="20s", help="of each throughput run")
    parser.add_argument("--rehearsal-users", type=int, default=4, help="paced clients during rollout and kill")
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint (default: the model store's)")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports" / "replicas")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **REPLICA_ENV}
    if args.checkpoint:
        env["CHECKPOINT_DIR"] = str(args.checkpoint.resolve())
    workdir = Path(tempfile.mkdtemp(prefix="replicas-", dir=args.reports))
    started = time.time()
    with Fleet(env, workdir, args.replicas) as fleet:
        print(f"{args.replicas} replicas behind haproxy on {fleet.balancer.url}, Prometheus on {fleet.prometheus.url}",
              flush=True)
        results = {"throughput": throughput(fleet, list(range(1, args.replicas + 1)), args.users, args.duration,
                                            args.reports)}
        for row in results["throughput"]:
            print(f"  {row['replicas']} replica(s), {row['through']}: {row['ok_rps']:.1f} ok requests/s, "
                  f"{row['shed']} shed, {row['error']} errors; cores busy {row['cores_busy']:.2f}, of which the "
                  f"replicas {row['replicas_cores']:.2f}; per replica {row.get('per_replica', '-')}", flush=True)
        results["rollout"] = rehearse_rollout(fleet, args.rehearsal_users, args.reports)
        print(f"rolling replacement: {results['rollout']['load']}", flush=True)
        results["kill"] = rehearse_kill(fleet, args.rehearsal_users, args.reports)
        kill = results["kill"]["kill"]
        print(f"SIGKILL of {kill['slot']}: {results['kill']['load']}; slow uploads to it: {kill['uploads']}; "
              f"{kill['in_flight']} requests in flight on it, "
              f"out of the balancer in {kill['down_s']:.2f} s, back in {kill['restart_s']:.1f} s", flush=True)
        results["aggregation"] = aggregation(fleet)
        print(f"dashboard and alert sums: {results['aggregation']['groups_compared']} groups compared", flush=True)
    results["seconds"] = time.time() - started
    (args.reports / "replicas.json").write_text(json.dumps(results, indent=2, default=str))
    problems = [p for step in ("rollout", "kill", "aggregation") for p in results[step]["problems"]]
    for problem in problems:
        print(f"FAIL  {problem}")
    print("all checks passed" if not problems else f"{len(problems)} checks failed", f"; reports in {args.reports}/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
