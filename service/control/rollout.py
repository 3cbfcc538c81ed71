"""Safe rollouts: a candidate version served beside the current one, judged on live traffic, then
promoted (with the move every worker already knows, service.control.moves) or rolled back.

  shadow   a share of requests also runs on the candidate, off the answer path: the answer and its
           latency are the served version's; top-1 agreement and the probability shift are counted
  canary   a share of clients (sticky: their X-Client-Id, else their address) is answered by the
           candidate; each answer names the version that computed it

A rollout is a plan in the control directory, staged (shadow 10%, then canary 5%, 25%, 50%, ...):
every worker loads the candidate beside its version with the checks of a move, and tallies its stage;
one worker at a time (an flock) is the judge, adding up every worker's tally and holding it to the
stage's gates. All pass: the stage has `passed` (its caller starts the next) or, for the last, the
candidate is promoted. One fails, a worker cannot load the candidate, or the operator stops it: every
worker drops the candidate and serves its version alone ("rolled_back", with the reason).

Files (beside service.control.control_dir's):
  rollout.json         the plan and its state
  rollout-<pid>.json   each worker's tally of the current stage
  rollout.lock         the judge's turn
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from model.atomic import atomic_write_bytes
from service.control.control_dir import ControlDir

MODES = ("shadow", "canary")
LIVE = ("running", "passed", "promoting")  # the states in which workers keep the candidate beside
LATENCY_SAMPLES = 2000  # the most recent latencies a worker keeps per version, for the p99s


@dataclass
class Gates:
    """What a stage must show, over its own traffic, before it passes."""

    min_requests: int = 200  # shadow: images compared; canary: requests the candidate answered
    min_agreement: float = 0.95  # shadow: the share of images whose top-1 class is the served version's
    max_shift: float = 0.2  # shadow: mean total-variation distance between the two probability vectors
    max_error_increase: float = 0.01  # canary: candidate's error rate minus the served version's
    max_p99_ratio: float = 1.5  # canary: candidate's p99 over the served version's

    @classmethod
    def parse(cls, values: dict | None) -> Gates:
        values = dict(values or {})
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown gates {sorted(unknown)}; the gates: {sorted(names)}")
        gates = cls(**values)
        if gates.min_requests < 1 or not 0 <= gates.min_agreement <= 1 or gates.max_p99_ratio <= 0:
            raise ValueError("gates out of range: min_requests >= 1, 0 <= min_agreement <= 1, max_p99_ratio > 0")
        return gates


@dataclass
class Plan:
    candidate: str  # full tag
    served: str  # the version it is judged against (and goes back to)
    mode: str  # shadow | canary
    share: float  # of requests (shadow) or clients (canary)
    gates: Gates
    promote: bool = True  # this stage, once passed, promotes the candidate (else it holds: "passed")
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # the rollout (canary buckets hash it)
    stage: int = 1
    state: str = "running"  # running | passed | promoting | promoted | rolled_back
    reason: str = ""
    started: float = field(default_factory=time.time)  # this stage's start (epoch seconds)
    decided: float = 0.0
    # the served version's error rate and p99 in the last stage that had both versions: what a canary
    # stage with no served traffic left (a share of 100%) is held to
    baseline: dict = field(default_factory=dict)
    decided_on: dict = field(default_factory=dict)  # the stage's numbers when it was decided (GET shows them)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(**{**data, "gates": Gates(**data["gates"])})


@dataclass
class Tally:
    """One worker's count of one stage (shadow comparisons, canary and served requests, their latencies);
    added up across workers by `merged`."""

    stage: int = 0
    rollout: str = ""
    pid: int = 0
    candidate: str = ""  # what this worker holds beside its version ("" none)
    candidate_state: str = ""  # loading | ready | refused
    error: str = ""
    compared: int = 0
    agreed: int = 0
    shift_sum: float = 0.0
    dropped: int = 0  # shadow work dropped under load
    served_requests: int = 0
    served_errors: int = 0
    candidate_requests: int = 0
    candidate_errors: int = 0
    served_latency: list[float] = field(default_factory=list)
    candidate_latency: list[float] = field(default_factory=list)

    def add_latency(self, candidate: bool, seconds: float) -> None:
        samples = self.candidate_latency if candidate else self.served_latency
        samples.append(round(seconds, 5))
        if len(samples) > LATENCY_SAMPLES:
            del samples[:len(samples) - LATENCY_SAMPLES]


def p99(samples: list[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def numbers(tallies: list[Tally]) -> dict:
    """The stage's numbers, every worker's tally added up."""
    total = lambda name: sum(getattr(t, name) for t in tallies)  # noqa: E731
    compared, served, candidate = total("compared"), total("served_requests"), total("candidate_requests")
    served_latency = [s for t in tallies for s in t.served_latency]
    candidate_latency = [s for t in tallies for s in t.candidate_latency]
    return {
        "compared": compared,
        "agreement": total("agreed") / compared if compared else None,
        "mean_shift": total("shift_sum") / compared if compared else None,
        "shadow_dropped": total("dropped"),
        "served_requests": served,
        "candidate_requests": candidate,
        "served_error_rate": total("served_errors") / served if served else None,
        "candidate_error_rate": total("candidate_errors") / candidate if candidate else None,
        "served_p99_s": p99(served_latency),
        "candidate_p99_s": p99(candidate_latency),
    }


def judge(plan: Plan, found: dict) -> tuple[str, list[dict]]:
    """("pass" | "fail" | "wait", each gate's verdict) for the stage's numbers `found`."""
    gates, verdicts = plan.gates, []
    seen = found["compared"] if plan.mode == "shadow" else found["candidate_requests"]
    verdicts.append(_verdict("min_requests", seen, gates.min_requests, seen >= gates.min_requests))
    if plan.mode == "shadow":
        checks = [("min_agreement", found["agreement"], gates.min_agreement, lambda v, g: v >= g),
                  ("max_shift", found["mean_shift"], gates.max_shift, lambda v, g: v <= g)]
    else:
        served_errors, served_p99 = found["served_error_rate"], found["served_p99_s"]
        if found["served_requests"] == 0:  # nothing served beside it now: the last stage's served numbers
            served_errors, served_p99 = plan.baseline.get("served_error_rate"), plan.baseline.get("served_p99_s")
        error_increase = None
        if found["candidate_error_rate"] is not None:
            error_increase = found["candidate_error_rate"] - (served_errors or 0.0)
        ratio = None
        if found["candidate_p99_s"] is not None and served_p99:
            ratio = found["candidate_p99_s"] / served_p99
        checks = [("max_error_increase", error_increase, gates.max_error_increase, lambda v, g: v <= g),
                  ("max_p99_ratio", ratio, gates.max_p99_ratio, lambda v, g: v <= g)]
    for name, value, gate, passes in checks:
        verdicts.append(_verdict(name, value, gate, value is not None and passes(value, gate)))
    if seen < gates.min_requests:  # too little traffic yet to judge: no verdict on the rest
        return "wait", verdicts
    return ("pass" if all(v["passed"] for v in verdicts) else "fail"), verdicts


def _verdict(name: str, value, gate, passed: bool) -> dict:
    return {"gate": name, "value": None if value is None else round(value, 6), "limit": gate, "passed": passed}


class RolloutDir:
    """A rollout's files in a server's control directory."""

    def __init__(self, control: ControlDir):
        self.control = control
        self.path: Path = control.path

    def plan(self) -> Plan | None:
        try:
            return Plan.from_dict(json.loads((self.path / "rollout.json").read_text()))
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None

    def write_plan(self, plan: Plan) -> None:
        atomic_write_bytes(self.path / "rollout.json", json.dumps(plan.to_dict()).encode())

    def write_tally(self, tally: Tally) -> None:
        atomic_write_bytes(self.path / f"rollout-{tally.pid}.json", json.dumps(asdict(tally)).encode())

    def tallies(self, plan: Plan) -> list[Tally]:
        """The live workers' tallies of the plan's current stage."""
        return [tally for tally in self.control.live_reports("rollout-*.json", Tally)
                if tally.rollout == plan.id and tally.stage == plan.stage]

    def exclusive(self):
        """The plan's lock, waited for: the admin calls change the plan under it, and the judge judges
        under it (`judges_turn`, the same file), so a decision never overwrites a stage started meanwhile."""
        return self.control.taking_turns("rollout")

    @contextlib.contextmanager
    def judges_turn(self):
        """True to the one worker whose turn it is to judge (an flock, never waited for), else False."""
        with open(self.path / "rollout.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def state_of(rollouts: RolloutDir, expected_workers: int) -> dict:
    """What GET /admin/rollout shows: the plan, its numbers, the gates' verdicts, every worker's part."""
    plan = rollouts.plan()
    if plan is None:
        return {"state": "none"}
    tallies = rollouts.tallies(plan)
    found = numbers(tallies)
    if not plan.live and plan.decided_on:
        found = plan.decided_on  # decided, and the workers' tallies reset since: the numbers it was decided on
    verdict, gates = judge(plan, found)
    workers = [{"pid": t.pid, "candidate": t.candidate, "state": t.candidate_state, "error": t.error}
               for t in tallies]
    shown = {k: v for k, v in plan.to_dict().items() if k != "decided_on"}
    return {**shown, "verdict": verdict, "numbers": found, "gates": gates, "workers": workers,
            "expected_workers": expected_workers}


class Judge:
    """Each worker's judge thread body: when it is this worker's turn, hold the live stage to its gates,
    and act: `promote(plan)` (the move; returns "" or why it failed), or roll back."""

    def __init__(self, rollouts: RolloutDir, expected_workers: int, promote: Callable[[Plan], str],
                 on_decision: Callable[[str], None] = lambda decision: None):
        self.rollouts, self.expected_workers = rollouts, expected_workers
        self.promote, self.on_decision = promote, on_decision

    def once(self) -> str | None:
        """One look; the decision taken, if any."""
        with self.rollouts.judges_turn() as mine:
            if not mine:
                return None
            plan = self.rollouts.plan()
            if plan is None or plan.state != "running":
                return None
            tallies = self.rollouts.tallies(plan)
            refused = [t for t in tallies if t.candidate_state == "refused"]
            if refused:
                return self._roll_back(plan, f"worker {refused[0].pid} could not load {plan.candidate}: "
                                             f"{refused[0].error}")
            found = numbers(tallies)
            verdict, gates = judge(plan, found)
            plan.decided_on = found
            if verdict == "fail":
                failed = "; ".join(f"{g['gate']}: {g['value']} against {g['limit']}" for g in gates if not g["passed"])
                return self._roll_back(plan, f"stage {plan.stage} ({plan.mode} {plan.share:.0%}) failed {failed}")
            if verdict == "pass":
                return self._passed(plan, found)
            return None

    def _passed(self, plan: Plan, found: dict) -> str:
        if found["served_requests"]:
            plan.baseline = {"served_error_rate": found["served_error_rate"], "served_p99_s": found["served_p99_s"]}
        if not plan.promote:
            self._decide(plan, "passed", "")
            return "passed"
        self._decide(plan, "promoting", "")
        why = self.promote(plan)
        if why:
            return self._roll_back(plan, f"the promotion failed: {why}")
        self._decide(plan, "promoted", "")
        self.on_decision("promoted")
        return "promoted"

    def _roll_back(self, plan: Plan, reason: str) -> str:
        self._decide(plan, "rolled_back", reason)
        self.on_decision("rolled_back")
        return "rolled_back"

    def _decide(self, plan: Plan, state: str, reason: str) -> None:
        plan.state, plan.reason, plan.decided = state, reason, time.time()
        self.rollouts.write_plan(plan)
