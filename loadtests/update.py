"""Model updates under load: v1 -> v2 -> v1 while Locust runs, a tampered v3 refused, then ten moves in
a row, with gates on failed requests, the versions that answered, p99 during the moves and memory.

    python -m loadtests.update --preset small --layout single
    python -m loadtests.update --preset alexnet --layout split --gates behaviour

Behaviour gates (a defect breaks them): 0 failed requests, every answer named v1 or v2 (both seen),
v3 refused, memory after ten moves within 10% of where it started. The speed gate: p99 of the
answers that overlapped a move at most 2x the steady p99. The versions are untrained checkpoints of
the preset (their answers mean nothing; their speed and size are the preset's), registered in a
private model store. Loopback only, bounded in time: it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from loadtests.__main__ import Gate, load_scenario
from testkit.locust import locust_command, locust_results
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess

NAME = "cnn-update"
ADMIN_KEY = "loadtest-admin"
STEADY_S = 20  # Locust's users ramp up, then the steady p99 is measured over this
SETTLE_S = 5  # between moves


def publish_versions(preset: str, work: Path, env: dict[str, str]) -> dict[str, str]:
    """v1 and v2 (two random initializations of the preset) and a tampered copy of v2, registered."""
    def register(directory: Path) -> str:
        out = subprocess.run([sys.executable, "-m", "training", "register", str(directory), "--name", NAME],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip().split()[-1]

    tags = {"v1": register(untrained_checkpoint(preset, work / "v1")),
            "v2": register(untrained_checkpoint(preset, work / "v2"))}
    tags["v3"] = register(work / "v2")
    stored = Path(env["BENTOML_HOME"]) / "models" / NAME / tags["v3"].split(":")[1] / "weights.safetensors"
    blob = bytearray(stored.read_bytes())
    blob[-7] ^= 0x5A
    stored.write_bytes(bytes(blob))
    return tags


def move(url: str, tag: str) -> tuple[float, float, httpx.Response]:
    started = time.time()
    response = httpx.post(f"{url}/admin/model", json={"tag": tag}, timeout=600,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return started, time.time(), response


def workers_rss(server: ServerProcess) -> dict[str, int]:
    """Resident memory of the API and model workers, summed per kind."""
    from testkit.server import process_kind

    totals: dict[str, int] = {}
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            kind = process_kind(" ".join(child.cmdline()))
            totals[kind] = totals.get(kind, 0) + child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return totals


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def drive(url: str, tags: dict[str, str], server: ServerProcess, moves: int) -> dict:
    """The moves, while Locust runs: their windows, answers, and memory before and after `moves` moves."""
    time.sleep(STEADY_S)
    windows, answers = [], {}
    for label, tag in (("v2", tags["v2"]), ("v1", tags["v1"])):
        start, end, response = move(url, tag)
        windows.append((start, end))
        answers[label] = response.status_code
        time.sleep(SETTLE_S)
    answers["v3"] = move(url, tags["v3"])[2].json().get("error")
    time.sleep(SETTLE_S)
    memory_before = workers_rss(server)
    for index in range(moves):
        start, end, response = move(url, tags["v2" if index % 2 == 0 else "v1"])
        windows.append((start, end))
        answers[f"move{index}"] = response.status_code
    time.sleep(SETTLE_S)
    return {"windows": windows, "answers": answers, "memory_before": memory_before,
            "memory_after": workers_rss(server)}


def gates(summary: dict, driven: dict, tags: dict[str, str], started: float) -> list[Gate]:
    """Errors count over the whole run; 503s from the first move on (the cold start's burst of 16 users
    onto a fresh server may be refused by admission control: that is not the move's doing)."""
    errors = sum(e.get("error", 0) for e in summary["endpoints"].values())
    moving = driven["windows"][0][0]
    shed = sum(1 for t, _, outcome in summary["timeline"] if outcome == "shed" and t >= moving)
    ok = [(t, ms) for t, ms, outcome in summary["timeline"] if outcome == "ok"]
    during = [ms for t, ms in ok if any(a <= t <= b for a, b in driven["windows"])]
    steady = [ms for t, ms in ok if started + 5 <= t < moving]
    moves_ok = all(code == 200 for key, code in driven["answers"].items() if key != "v3")
    growth = max(driven["memory_after"].get(k, 0) / max(1, v) for k, v in driven["memory_before"].items())
    models = set(summary["models"])
    result = [
        Gate("failed_requests (errors, and 503s from the first move on)", 0, errors + shed, errors + shed == 0),
        Gate("answers_by_other_versions", 0, len(models - {tags["v1"], tags["v2"]}),
             models == {tags["v1"], tags["v2"]}),
        Gate("moves_succeeded", 1, float(moves_ok), moves_ok),
        Gate("tampered_v3_refused", 1, float(driven["answers"]["v3"] == "checkpoint_invalid"),
             driven["answers"]["v3"] == "checkpoint_invalid"),
        Gate("memory_after_moves_over_before", 1.10, growth, growth <= 1.10),
    ]
    ratio = p99(during) / max(1e-9, p99(steady))
    result.append(Gate("p99_during_moves_over_steady (speed)", 2.0, ratio, ratio <= 2.0))
    return result


def run(preset: str, layout: str, moves: int, reports: Path) -> tuple[list[Gate], dict]:
    work = Path(tempfile.mkdtemp(prefix="update-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    try:
        tags = publish_versions(preset, work, env)
        server = ServerProcess({**env, "MODEL_TAG": tags["v1"], "ADMIN_KEY": ADMIN_KEY, "LAYOUT": layout},
                               reports / f"update_{preset}_{layout}_server.log")
        try:
            server.wait_ready(timeout=300)
            scenario = load_scenario(ROOT / "loadtests" / "slo.toml", "smoke", [], "behaviour")
            duration = STEADY_S + 4 * SETTLE_S + 20 * moves + 60
            scenario.update({"_name": f"update_{preset}_{layout}", "users": 16, "spawn_rate": 16,
                             "duration": f"{duration}s"})
            command, locust_env = locust_command(scenario, server.url, reports)
            locust_env.update({"LOCUST_MODELS": f"{tags['v1']},{tags['v2']}", "LOCUST_TIMELINE": "1"})
            started = time.time()
            locust = subprocess.Popen(command, cwd=ROOT, env=locust_env)
            driven: dict = {}
            mover = threading.Thread(target=lambda: driven.update(drive(server.url, tags, server, moves)))
            mover.start()
            mover.join()
            locust.terminate()  # the moves are done: stop the load (it writes its summary on the way out)
            locust.wait(timeout=120)
            summary, _ = locust_results(scenario, reports)
        finally:
            server.stop()
        moving = driven["windows"][0][0]
        cold = sum(1 for t, _, outcome in summary["timeline"] if outcome == "shed" and t < moving)
        seconds = sorted(round(b - a, 2) for a, b in driven["windows"])
        return gates(summary, driven, tags, started), {"models": summary["models"], "cold_start_503s": cold,
                                                       "move_seconds": seconds, **driven}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layout", default="single", choices=["single", "split"])
    parser.add_argument("--moves", type=int, default=10, help="moves in a row for the memory gate")
    parser.add_argument("--gates", default="all", choices=["all", "behaviour"])
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    results, details = run(args.preset, args.layout, args.moves, args.reports)
    if args.gates == "behaviour":
        results = [g for g in results if "(speed)" not in g.name]
    print(json.dumps({"preset": args.preset, "layout": args.layout, "models": details["models"],
                      "cold_start_503s": details["cold_start_503s"], "move_seconds": details["move_seconds"],
                      "memory_before": details["memory_before"], "memory_after": details["memory_after"]}))
    for gate in results:
        print(gate.line())
    return 0 if all(g.passed for g in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
