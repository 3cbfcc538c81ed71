"""Rollouts under load: while Locust runs, a bad candidate (fc8's rows rolled: it disagrees with the served
version) is rolled back by its shadow stage's gates by itself, then a good one (the served weights as
another version) goes through shadow and canary stages and is promoted.

    python -m loadtests.rollout --preset small --layout single
    python -m loadtests.rollout --preset alexnet --layout split --gates behaviour

Behaviour gates (a defect breaks them): 0 failed requests other than 503 + Retry-After over the whole
run; the bad candidate rolled back, by its agreement gate; the good one promoted; every answer named
the served version or the good candidate (never the bad one); memory of the workers after both
rollouts (the losing versions' last requests done) within 10% of where it started. Reported, as a speed
gate: p99 of the answers during the good candidate's shadow stage over the steady p99 (at most 1.5x).
The versions are untrained checkpoints of the preset (their answers mean nothing; agreement between
two of them does). Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from loadtests.__main__ import Gate
from loadtests.update import ADMIN_KEY, WARMUP_S, p99, serving, under_locust, workers_rss
from testkit.models import untrained_checkpoint
from testkit.server import ROOT, ServerProcess
from training.rollout import Service, run_stage

NAME = "cnn-rollout"
STEADY_S = 30  # steady load before the first rollout: the baseline p99, and memory before
AFTER_S = 10  # steady load after the promotion, before memory is read again
SHADOW, CANARY = 0.1, (0.25, 0.5)
GATES = {"min_requests": 200, "min_agreement": 0.95}
STAGE_TIMEOUT_S = 300.0


def publish_versions(preset: str, work: Path, env: dict[str, str]) -> dict[str, str]:
    """served; good (its weights again, another version); bad (fc8's rows rolled by one class)."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    def register(directory: Path) -> str:
        out = subprocess.run([sys.executable, "-m", "training", "register", str(directory), "--name", NAME],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip().split()[-1]

    served = untrained_checkpoint(preset, work / "served")
    checkpoint = load_checkpoint(served)
    order = torch.roll(torch.arange(checkpoint.manifest.model_config.num_classes), 1)
    with torch.no_grad():
        checkpoint.model.fc8.weight.copy_(checkpoint.model.fc8.weight[order])
        checkpoint.model.fc8.bias.copy_(checkpoint.model.fc8.bias[order])
    m = checkpoint.manifest
    save_checkpoint(work / "bad", checkpoint.model, m.class_names, m.preprocessing, m.preset, m.training)
    return {"served": register(served), "good": register(served), "bad": register(work / "bad")}


def roll_out(service: Service, tag: str, stages: list[tuple[str, float]]) -> tuple[dict, list]:
    """Every stage in turn (the last promotes); the last state and each stage's (mode, start, end)."""
    windows, state = [], {}
    for number, (mode, share) in enumerate(stages, 1):
        start = time.time()
        body = {"candidate": tag, "mode": mode, "share": share, "gates": GATES, "promote": number == len(stages)}
        state = run_stage(service, body, poll_s=0.5, timeout_s=STAGE_TIMEOUT_S)
        windows.append((mode, start, time.time()))
        if state.get("state") != "passed":
            break
    return state, windows


def drive(url: str, tags: dict[str, str], server: ServerProcess) -> dict:
    service = Service(url, ADMIN_KEY)
    time.sleep(STEADY_S)
    memory_before = workers_rss(server)
    bad, bad_windows = roll_out(service, tags["bad"], [("shadow", SHADOW), *(("canary", s) for s in CANARY)])
    good, good_windows = roll_out(service, tags["good"], [("shadow", SHADOW), *(("canary", s) for s in CANARY)])
    time.sleep(AFTER_S)
    return {"bad": {k: bad.get(k) for k in ("state", "stage", "reason", "numbers")},
            "good": {k: good.get(k) for k in ("state", "stage", "reason", "numbers")},
            "windows": bad_windows + good_windows, "good_shadow": good_windows[0][1:],
            "memory_before": memory_before, "memory_after": workers_rss(server)}


def gates(summary: dict, driven: dict, tags: dict[str, str], started: float) -> list[Gate]:
    errors = sum(e.get("error", 0) for e in summary["endpoints"].values())
    bad, good = driven["bad"], driven["good"]
    bad_ok = bad["state"] == "rolled_back" and "min_agreement" in (bad["reason"] or "")
    models = set(summary["models"])
    growth = max(driven["memory_after"].get(k, 0) / max(1, v) for k, v in driven["memory_before"].items())
    first = min(start for _, start, _ in driven["windows"])
    shadow_start, shadow_end = driven["good_shadow"]
    steady = [ms for end, ms, outcome in summary["timeline"] if outcome == "ok" and started + WARMUP_S < end < first]
    shadow = [ms for end, ms, outcome in summary["timeline"]
              if outcome == "ok" and shadow_start <= end - ms / 1000 and end <= shadow_end]
    ratio = p99(shadow) / max(1e-9, p99(steady))
    return [
        Gate("failed_requests (all but 503 + Retry-After)", 0, errors, errors == 0),
        Gate("bad_candidate_rolled_back_by_agreement", 1, float(bad_ok), bad_ok),
        Gate("good_candidate_promoted", 1, float(good["state"] == "promoted"), good["state"] == "promoted"),
        Gate("answers_by_other_versions", 0, len(models - {tags["served"], tags["good"]}),
             models <= {tags["served"], tags["good"]} and tags["good"] in models),
        Gate("memory_after_rollouts_over_before", 1.10, growth, growth <= 1.10),
        Gate("p99_during_shadow_over_steady (speed)", 1.5, ratio, ratio <= 1.5),
    ]


def run(preset: str, layout: str, reports: Path) -> tuple[list[Gate], dict]:
    with serving("rollout", preset, layout, reports, publish_versions, "served") as (tags, server):
        summary, driven, started = under_locust(
            f"rollout_{preset}_{layout}", server, reports, STEADY_S + AFTER_S + 8 * STAGE_TIMEOUT_S,
            {"LOCUST_MODELS": f"{tags['served']},{tags['good']}", "LOCUST_CLIENT_IDS": "256"},
            lambda: drive(server.url, tags, server))
    return gates(summary, driven, tags, started), {"models": summary["models"], **driven}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layout", default="single", choices=["single", "split"])
    parser.add_argument("--gates", default="all", choices=["all", "behaviour"])
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    results, details = run(args.preset, args.layout, args.reports)
    if args.gates == "behaviour":
        results = [g for g in results if "(speed)" not in g.name]
    print(json.dumps({"preset": args.preset, "layout": args.layout, **{k: details[k] for k in
                      ("models", "bad", "good", "memory_before", "memory_after")}}))
    for gate in results:
        print(gate.line())
    return 0 if all(g.passed for g in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
