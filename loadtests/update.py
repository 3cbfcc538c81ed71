"""Model updates under load: v1 -> v2 -> v1 while Locust runs, a tampered v3 refused, then ten moves
(each followed by as long again of steady load), with gates on failed requests, the 503s the moves
cause, the versions that answered, p99 during the moves and memory.

    python -m loadtests.update --preset small --layout single
    python -m loadtests.update --preset alexnet --layout split --gates behaviour

Behaviour gates (a defect breaks them): 0 failed requests other than 503 + Retry-After over the
whole run; the moves cause no 503s beyond what the same load gets without them (the 503 rate of
the requests that overlapped a move, against the steady rate of the others: a preset the load alone
overloads -- alexnet under this mix on 2 cores -- is refused a share of its requests whether or not
anything moves, and those refusals are admission control's, not the move's; where the steady load
gets no 503, the moves must get none); every answer named v1 or v2 (both seen), v3 refused, memory
after ten moves within 10% of where it started. The speed gate: p99 of the answers that overlapped
a move at most 2x the steady p99. The versions are untrained checkpoints of the preset (their
answers mean nothing; their speed and size are the preset's), registered in a private model store.
Loopback only, bounded in time: it stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil

from loadtests.__main__ import Gate, load_scenario
from testkit.locust import locust_command, locust_results
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess

NAME = "cnn-update"
ADMIN_KEY = "loadtest-admin"
STEADY_S = 30  # Locust's users ramp up, then the steady load is measured over this, before the first move
SETTLE_S = 5  # between moves
AFTER_S = 10  # steady load again after the last move
WARMUP_S = 5  # the cold start's burst of 16 users onto a fresh server: admission control's, counted apart
MOVE_TAIL_S = 2.0  # a move's reach past its call's answer: the old version freed, the heap frozen again


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


def drive(url: str, tags: dict[str, str], server: ServerProcess, moves: int, steady_s: float = STEADY_S) -> dict:
    """The moves, while Locust runs: their windows, answers, and memory before and after `moves` moves.
    Each move is followed by as long again of steady load (at least SETTLE_S, after its MOVE_TAIL_S),
    so that moving and steady time interleave: a drift in what else the machine runs meanwhile
    weighs on both alike."""
    def moved(tag: str) -> httpx.Response:
        start, end, response = move(url, tag)
        windows.append((start, end))
        time.sleep(MOVE_TAIL_S + max(SETTLE_S, end - start))
        return response

    time.sleep(steady_s)
    windows, answers = [], {}
    for label in ("v2", "v1"):
        answers[label] = moved(tags[label]).status_code
    answers["v3"] = moved(tags["v3"]).json().get("error")  # refused after its check: a window too
    memory_before = workers_rss(server)
    for index in range(moves):
        answers[f"move{index}"] = moved(tags["v2" if index % 2 == 0 else "v1"]).status_code
    time.sleep(AFTER_S)
    return {"windows": windows, "answers": answers, "memory_before": memory_before,
            "memory_after": workers_rss(server)}


def split_by_moves(timeline: list, windows: list[tuple[float, float]], started: float) -> tuple[list, list, list]:
    """Locust's answers (end time, ms, outcome) split into the cold start's (before started +
    WARMUP_S), those that overlapped a move (the call, and MOVE_TAIL_S after its answer) and the
    steady rest."""
    cold, moving, steady = [], [], []
    for entry in timeline:
        end, ms, _ = entry
        begin = end - ms / 1000
        if end < started + WARMUP_S:
            cold.append(entry)
        elif any(begin <= b + MOVE_TAIL_S and end >= a for a, b in windows):
            moving.append(entry)
        else:
            steady.append(entry)
    return cold, moving, steady


def excess_503s(moving: list, steady: list) -> tuple[int, float]:
    """(503s among the answers that overlapped a move, the most the steady 503 rate explains): the
    steady rate times their number, plus three binomial standard deviations; 0 when the steady
    load got no 503."""
    rate = sum(1 for _, _, outcome in steady if outcome == "shed") / max(1, len(steady))
    n = len(moving)
    return (sum(1 for _, _, outcome in moving if outcome == "shed"),
            rate * n + 3 * math.sqrt(n * rate * (1 - rate)))


def gates(summary: dict, driven: dict, tags: dict[str, str], started: float) -> list[Gate]:
    """Errors (failures other than 503 + Retry-After) count over the whole run; 503s during the moves
    against the steady rate (split_by_moves)."""
    errors = sum(e.get("error", 0) for e in summary["endpoints"].values())
    _, moving, steady = split_by_moves(summary["timeline"], driven["windows"], started)
    shed, explained = excess_503s(moving, steady)
    during = [ms for _, ms, outcome in moving if outcome == "ok"]
    calm = [ms for _, ms, outcome in steady if outcome == "ok"]
    moves_ok = all(code == 200 for key, code in driven["answers"].items() if key != "v3")
    growth = max(driven["memory_after"].get(k, 0) / max(1, v) for k, v in driven["memory_before"].items())
    models = set(summary["models"])
    result = [
        Gate("failed_requests (all but 503 + Retry-After)", 0, errors, errors == 0),
        Gate("503s_during_moves (limit: what the steady 503 rate explains)", explained, shed, shed <= explained),
        Gate("answers_by_other_versions", 0, len(models - {tags["v1"], tags["v2"]}),
             models == {tags["v1"], tags["v2"]}),
        Gate("moves_succeeded", 1, float(moves_ok), moves_ok),
        Gate("tampered_v3_refused", 1, float(driven["answers"]["v3"] == "checkpoint_invalid"),
             driven["answers"]["v3"] == "checkpoint_invalid"),
        Gate("memory_after_moves_over_before", 1.10, growth, growth <= 1.10),
    ]
    ratio = p99(during) / max(1e-9, p99(calm))
    result.append(Gate("p99_during_moves_over_steady (speed)", 2.0, ratio, ratio <= 2.0))
    return result


def counts(summary: dict, driven: dict, started: float) -> dict:
    """What the report prints: answers and 503s in the cold start, during the moves and steady."""
    found = {}
    for phase, entries in zip(("cold_start", "during_moves", "steady"),
                              split_by_moves(summary["timeline"], driven["windows"], started)):
        shed = sum(1 for _, _, outcome in entries if outcome == "shed")
        found[phase] = {"answers": len(entries), "503s": shed, "503_rate": round(shed / max(1, len(entries)), 4),
                        "ok_p99_ms": round(p99([ms for _, ms, outcome in entries if outcome == "ok"]), 1)}
    return found


@contextlib.contextmanager
def serving(name: str, preset: str, layout: str, reports: Path, publish: Callable, served: str):
    """A private model store with `publish(preset, workdir, env)`'s versions, and a ready server (admin key
    set) serving the one named `served`; (tags, server) inside the block, all removed after it."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    try:
        tags = publish(preset, work, env)
        server = ServerProcess({**env, "MODEL_TAG": tags[served], "ADMIN_KEY": ADMIN_KEY, "LAYOUT": layout},
                               reports / f"{name}_{preset}_{layout}_server.log")
        try:
            server.wait_ready(timeout=300)
            yield tags, server
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def under_locust(name: str, server: ServerProcess, reports: Path, duration_s: float, extra_env: dict[str, str],
                 drive: Callable[[], dict]) -> tuple[dict, dict, float]:
    """Locust's smoke mix from 16 users (LOCUST_TIMELINE on, `extra_env` added) against `server` while
    `drive()` runs, stopped when it returns (`duration_s` only bounds it). Returns Locust's summary, what
    `drive()` returned, and when the load started (epoch seconds)."""
    scenario = load_scenario(ROOT / "loadtests" / "slo.toml", "smoke", [], "behaviour")
    scenario.update({"_name": name, "users": 16, "spawn_rate": 16, "duration": f"{int(duration_s)}s"})
    command, locust_env = locust_command(scenario, server.url, reports)
    locust_env.update({"LOCUST_TIMELINE": "1", **extra_env})
    started = time.time()
    locust = subprocess.Popen(command, cwd=ROOT, env=locust_env)
    try:
        driven = drive()
    finally:
        locust.terminate()  # done: stop the load (it writes its summary on the way out)
        locust.wait(timeout=120)
    summary, _ = locust_results(scenario, reports)
    return summary, driven, started


def run(preset: str, layout: str, moves: int, reports: Path, steady_s: float = STEADY_S) -> tuple[list[Gate], dict]:
    with serving("update", preset, layout, reports, publish_versions, "v1") as (tags, server):
        summary, driven, started = under_locust(
            f"update_{preset}_{layout}", server, reports, steady_s + AFTER_S + 2 * 30 * (moves + 3) + 60,
            {"LOCUST_MODELS": f"{tags['v1']},{tags['v2']}"}, lambda: drive(server.url, tags, server, moves, steady_s))
    seconds = sorted(round(b - a, 2) for a, b in driven["windows"])
    return gates(summary, driven, tags, started), {"models": summary["models"],
                                                   "phases": counts(summary, driven, started),
                                                   "move_seconds": seconds, **driven}


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
                      "phases": details["phases"], "move_seconds": details["move_seconds"],
                      "memory_before": details["memory_before"], "memory_after": details["memory_after"]}))
    for gate in results:
        print(gate.line())
    return 0 if all(g.passed for g in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
