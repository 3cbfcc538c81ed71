"""Goodput under overload: clients that retry at once, batch requests, a CPU hog in the middle.

    python -m loadtests.goodput                        # every scenario, torchvision preset (~4 min)
    python -m loadtests.goodput --scenarios storm --runs 5 --preset torchvision

Each client is closed-loop and impolite: it sends its next request the moment
the last one is answered, 503 or not, ignoring Retry-After (as many real
clients do). Goodput is what the service *serves*: images in 200 answers per
second (for /explain, its forward passes: the model work it did).

Scenarios, each against a fresh `bentoml serve` (MAX_LATENCY_MS=3000, the
benchmark's budget):
  reference  the best goodput the service gives polite concurrency: 2, 4 and 8
             clients x 8 images (and 4, 8, 16 single-image clients); the
             ratios below are against the best of these, in the same run;
  storm      32 clients x 8 images;
  singles    128 clients x 1 image;
  mix        24 clients x 8 images to /classify + 8 clients asking /explain
             for occlusion maps;
  hog        the storm, with a CPU hog on every core for 5 s in the middle:
             goodput must come back within a few seconds after the hog stops.
For each: goodput / reference, statuses, accepted p50/p99 against the budget,
503s without Retry-After (must be 0), other errors (must be 0), and the
server's CPU per served image over its whole process tree.

The gates (`--gates`): goodput >= 90% of the reference and accepted p99 <=
1.5 x MAX_LATENCY_MS (speed: `make loadtest-goodput`); no error but 503 +
Retry-After and a healthy service afterwards (behaviour: also in `make test`,
tests/test_goodput.py, at a smaller scale).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.bench import cpu_seconds
from loadtests.hogs import start_hogs, stop_hogs
from testkit.server import ROOT, ServerProcess

BUDGET_MS = 3000


@dataclass(frozen=True)
class Clients:
    """`count` clients each posting `images` photos per request to `path` (extra form fields in `fields`)."""
    count: int
    images: int
    path: str = "/classify"
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        kind = self.path.strip("/") + ("" if not self.fields else ":" + ",".join(v for _, v in self.fields[:1]))
        return f"{self.count}x{self.images} {kind}"


@dataclass
class Tally:
    """What one group of clients got."""
    served_work: float = 0.0  # images (or forward passes, for /explain) in 200 answers
    statuses: collections.Counter = field(default_factory=collections.Counter)
    shed_without_retry_after: int = 0
    latencies: list[float] = field(default_factory=list)  # accepted requests, seconds
    refusal_latencies: list[float] = field(default_factory=list)
    timeline: collections.Counter = field(default_factory=collections.Counter)  # second -> served work

    def summary(self, seconds: float) -> dict:
        def pct(values, q):
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

        errors = sum(n for status, n in self.statuses.items() if status not in (200, 503))
        return {"goodput": self.served_work / seconds, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "errors": errors + self.shed_without_retry_after, "shed_without_retry_after":
                self.shed_without_retry_after, "accepted_p50_ms": pct(self.latencies, 0.5),
                "accepted_p99_ms": pct(self.latencies, 0.99), "refused_p50_ms": pct(self.refusal_latencies, 0.5)}


def multipart_bodies(photos, clients: Clients, variants: int = 8) -> list[tuple[bytes, dict]]:
    """Pre-encoded request bodies (the load generator's own CPU stays off the measurement)."""
    from urllib3 import encode_multipart_formdata

    field_name = "images" if clients.path in ("/classify", "/embed") else "image"
    bodies = []
    for start in range(variants):
        chosen = [photos[(start + i) % len(photos)] for i in range(clients.images)]
        fields = [(field_name, (p.name, p.data, p.content_type)) for p in chosen] + list(clients.fields)
        body, content_type = encode_multipart_formdata(fields)
        bodies.append((body, {"Content-Type": content_type}))
    return bodies


def work_done(clients: Clients, answer: bytes) -> float:
    """The model work one 200 answer carries: its images, or /explain's forward passes."""
    if clients.path == "/explain":
        return float(json.loads(answer).get("forward_passes", 1))
    return float(clients.images)


async def run_clients(url: str, groups: dict[Clients, list[tuple[bytes, dict]]], seconds: float,
                      on_second=None) -> dict[Clients, Tally]:
    """Every group's clients at once for `seconds`; `on_second(t)` is awaited once a second (the hog)."""
    import aiohttp

    tallies = {group: Tally() for group in groups}
    started = time.perf_counter()
    stop = started + seconds

    async def client(group: Clients, bodies, index: int, session) -> None:
        tally = tallies[group]
        i = index
        while time.perf_counter() < stop:
            body, headers = bodies[i % len(bodies)]
            i += 1
            sent = time.perf_counter()
            try:
                async with session.post(url + group.path, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status, retry_after, answer = type(err).__name__, None, b""
            now = time.perf_counter()
            if now > stop:
                break  # answered after the window: not counted either way
            tally.statuses[status] += 1
            if status == 200:
                work = work_done(group, answer)
                tally.served_work += work
                tally.latencies.append(now - sent)
                tally.timeline[int(now - started)] += work
            elif status == 503:
                tally.refusal_latencies.append(now - sent)
                if not retry_after:
                    tally.shed_without_retry_after += 1

    async def ticker() -> None:
        second = 0
        while time.perf_counter() < stop:
            await asyncio.sleep(max(0.0, started + second - time.perf_counter()))
            if on_second is not None:
                on_second(second)
            second += 1

    total = sum(group.count for group in groups)
    connector = aiohttp.TCPConnector(limit=total, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(ticker(), *(client(group, bodies, i, session)
                                         for group, bodies in groups.items() for i in range(group.count)))
    return tallies


class Hog:
    """A CPU hog on every core between two seconds of a run (started and stopped by `tick`)."""

    def __init__(self, start_s: int, stop_s: int, cores: int | None = None):
        self.start_s, self.stop_s, self.cores = start_s, stop_s, cores or os.cpu_count() or 1
        self.processes: list[subprocess.Popen] = []

    def tick(self, second: int) -> None:
        if second == self.start_s:
            self.processes = start_hogs(self.cores)
        elif second == self.stop_s:
            self.close()

    def close(self) -> None:
        stop_hogs(self.processes)
        self.processes = []


def measure(server: ServerProcess, groups: dict[Clients, list], seconds: float, hog: Hog | None = None) -> dict:
    """One load on a running server: per group, and in all; CPU per served unit of work."""
    before = sum(cpu_seconds(server.process.pid).values())
    try:
        tallies = asyncio.run(run_clients(server.url, groups, seconds, hog.tick if hog else None))
    finally:
        if hog:
            hog.close()
    cpu = sum(cpu_seconds(server.process.pid).values()) - before
    served = sum(t.served_work for t in tallies.values())
    timeline = collections.Counter()
    for tally in tallies.values():
        timeline.update(tally.timeline)
    result = {"groups": {g.label: t.summary(seconds) for g, t in tallies.items()},
              "goodput": served / seconds, "server_cpu_ms_per_unit": 1000 * cpu / served if served else float("nan"),
              "timeline": [timeline.get(s, 0.0) for s in range(int(seconds))]}
    result["errors"] = sum(g["errors"] for g in result["groups"].values())
    result["accepted_p99_ms"] = max((g["accepted_p99_ms"] for g in result["groups"].values()
                                     if g["accepted_p99_ms"] == g["accepted_p99_ms"]), default=float("nan"))
    result["accepted_max_ms"] = 1000 * max((max(t.latencies, default=0.0) for t in tallies.values()), default=0.0)
    return result


def serve(preset: str, reports: Path, env: dict[str, str], label: str) -> ServerProcess:
    from testkit.models import untrained_checkpoint

    checkpoint = untrained_checkpoint(preset, reports / "models" / preset)
    server_env = {**os.environ, "CHECKPOINT_DIR": str(checkpoint), "BENTOML_DO_NOT_TRACK": "True",
                  "MAX_LATENCY_MS": str(BUDGET_MS), **env}
    server = ServerProcess(server_env, reports / f"goodput_{label}.log")
    server.wait_ready(timeout=300)
    return server


def scenario_loads(name: str) -> dict[str, list[Clients]]:
    """The scenario's load, and the polite loads whose best is its reference."""
    occlusion = (("method", "occlusion"), ("window", "56"), ("stride", "56"))
    return {
        "storm": {"load": [Clients(32, 8)], "reference": [[Clients(n, 8)] for n in (2, 4, 8)]},
        "hog": {"load": [Clients(32, 8)], "reference": [[Clients(n, 8)] for n in (2, 4, 8)]},
        "singles": {"load": [Clients(128, 1)], "reference": [[Clients(n, 1)] for n in (4, 8, 16)]},
        "mix": {"load": [Clients(24, 8), Clients(8, 1, "/explain", occlusion)],
                "reference": [[Clients(n, 8), Clients(max(1, n // 3), 1, "/explain", occlusion)] for n in (3, 6)]},
    }[name]


def loads_of(name: str, pool) -> tuple[dict, list[dict]]:
    """The scenario's load, and the polite loads whose best is its reference, with their bodies."""
    loads = scenario_loads(name)

    def bodies(groups):
        return {g: multipart_bodies(pool, g) for g in groups}

    return bodies(loads["load"]), [bodies(groups) for groups in loads["reference"]]


def run_load(server: ServerProcess, name: str, load: dict, seconds: float) -> dict:
    """The scenario's load on a running server (the hog scenario: a CPU hog on every core for 5 s
    after `seconds`, then `seconds` more), and whether the service is healthy afterwards."""
    hog = Hog(int(seconds), int(seconds) + 5) if name == "hog" else None
    result = measure(server, load, 2 * seconds + 5 if hog else seconds, hog)
    result["healthy_after"] = server.ready()
    if hog:  # the seconds after the hog stopped (but the first two), against the seconds before it
        before = result["timeline"][1:hog.start_s]
        after = result["timeline"][hog.stop_s + 2:]
        result["after_hog_over_before"] = statistics.median(after) / max(1e-9, statistics.median(before))
    return result


def run_scenario(name: str, preset: str, reports: Path, seconds: float, env: dict[str, str]) -> dict:
    """On a fresh server: the polite references, then the scenario's load, then its ratio to the best."""
    from testkit.images import photos

    load, references = loads_of(name, photos((640,), ("JPEG",)))
    server = serve(preset, reports, env, name)
    try:
        measure(server, references[0], 2.0)  # warm-up: connections, allocator, admission's first judgements
        best = max((measure(server, reference, seconds) for reference in references), key=lambda r: r["goodput"])
        result = run_load(server, name, load, seconds)
    finally:
        server.stop()
    result["reference_goodput"] = best["goodput"]
    result["over_reference"] = result["goodput"] / best["goodput"]
    result["reference_cpu_ms_per_unit"] = best["server_cpu_ms_per_unit"]
    result["reference_groups"] = {label: round(g["goodput"], 1) for label, g in best["groups"].items()}
    return result


HANG_GUARD_S = 15.0


def check(result: dict, gates: str, budget_ms: float = BUDGET_MS) -> list[str]:
    """What the result breaks. Behaviour (any machine, however busy): no answer but 200 and 503 +
    Retry-After, something served, no accepted request slower than the hang guard, healthy after.
    Speed (`all`, this machine): goodput, accepted p99, the return after the hog."""
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} answers other than 200 and 503 + Retry-After")
    if not result["goodput"]:
        problems.append("nothing served")
    if result["accepted_max_ms"] > HANG_GUARD_S * 1000:
        problems.append(f"an accepted request took {result['accepted_max_ms']:.0f} ms (hang guard {HANG_GUARD_S} s)")
    if not result["healthy_after"]:
        problems.append("service not ready after the load")
    if gates == "all":
        if result["over_reference"] < 0.9:
            problems.append(f"goodput {result['over_reference']:.2f} of the reference (< 0.90)")
        if result["accepted_p99_ms"] > 1.5 * budget_ms:
            problems.append(f"accepted p99 {result['accepted_p99_ms']:.0f} ms > 1.5 x {budget_ms:.0f} ms")
        if "after_hog_over_before" in result and result["after_hog_over_before"] < 0.9:
            problems.append(f"goodput after the hog {result['after_hog_over_before']:.2f} of before (< 0.90)")
    return problems


def describe(name: str, result: dict) -> str:
    groups = "; ".join(f"{label}: {g['goodput']:.1f}/s, statuses {g['statuses']}, accepted p50/p99 "
                       f"{g['accepted_p50_ms']:.0f}/{g['accepted_p99_ms']:.0f} ms, refused p50 {g['refused_p50_ms']:.0f} ms"
                       for label, g in result["groups"].items())
    references = f", {result['reference_groups']}" if result.get("reference_groups") else ""
    line = (f"{name}: goodput {result['goodput']:.1f}/s = {result['over_reference']:.2f} x reference "
            f"{result['reference_goodput']:.1f}/s; server CPU {result['server_cpu_ms_per_unit']:.2f} core-ms/unit "
            f"(reference {result['reference_cpu_ms_per_unit']:.2f}{references}); {groups}")
    if "after_hog_over_before" in result:
        line += f"; after the hog / before: {result['after_hog_over_before']:.2f}; timeline {result['timeline']}"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.goodput", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["storm", "singles", "mix", "hog"],
                        choices=["storm", "singles", "mix", "hog"])
    parser.add_argument("--preset", default="torchvision")
    parser.add_argument("--runs", type=int, default=1, help="fresh servers per scenario")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--gates", choices=["all", "behaviour"], default="all")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--env", action="append", default=[], help="server environment KEY=VALUE")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.env)
    results, failed = {}, []
    for name in args.scenarios:
        for run in range(args.runs):
            result = run_scenario(name, args.preset, args.reports, args.seconds, env)
            results[f"{name}/{run}"] = result
            problems = check(result, args.gates, float(env.get("MAX_LATENCY_MS", BUDGET_MS)))
            print(describe(f"{name} run {run + 1}", result) + (f"  FAILED: {problems}" if problems else ""),
                  flush=True)
            failed += [f"{name} run {run + 1}: {p}" for p in problems]
    (args.reports / "goodput.json").write_text(json.dumps(results, indent=2, default=str))
    for problem in failed:
        print("FAILED", problem)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
