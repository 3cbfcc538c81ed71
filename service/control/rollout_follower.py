"""A worker's side of a rollout (service.control.rollout): hold the candidate while the plan is live, report
this worker's tally, and take turns at judging.

Looked at on every poll of the version follower (service.control.follower), in its thread and at its
low CPU priority: the candidate is loaded as a move loads a version (`holder.load`: every hash verified,
compatible, the precision guard, warmed up), beside the served one, and dropped when the rollout ends;
its memory is then released as a moved-away-from version's is. The judge runs in a thread of its own,
since a promotion is a move, which waits for every worker's follower -- this one's too.
"""

from __future__ import annotations

import logging
import threading
import time

from service.control.control_dir import ControlDir
from service.control.follower import VersionFollower
from service.control.moves import move_all
from service.control.rollout import Judge, Plan, RolloutDir
from service.core.priority import lower_this_thread
from service.core.refusals import Refusal

JUDGE_SECONDS = 0.5  # how often the judge adds up the tallies

log = logging.getLogger(__name__)


class RolloutFollower:
    """`holder`: `load(tag)`, and `candidates` (service.runtime.rollout.CandidateHolder): what it holds
    beside its version, and its tally."""

    def __init__(self, rollouts: RolloutDir, holder, versions: VersionFollower):
        self.rollouts, self.holder, self.versions = rollouts, holder, versions
        self._refused: tuple[str, str] | None = None  # (rollout id, candidate) this worker could not load

    def poll_once(self) -> None:
        slot = self.holder.candidates
        plan = self.rollouts.plan()
        self.holder.metrics.announce_rollout(plan if plan is not None and plan.live else None)
        if plan is None or not plan.live:
            if slot.candidate is not None:
                self._drop()
                self.rollouts.write_tally(slot.snapshot())  # an empty tally: this worker holds none now
            return
        if slot.candidate is not None and slot.candidate.tag != plan.candidate:
            self._drop()
        if slot.candidate is None and self._refused != (plan.id, plan.candidate):
            self._load(plan)
        elif slot.candidate is not None:
            slot.restage(plan)
        self.rollouts.write_tally(slot.snapshot())

    def _load(self, plan: Plan) -> None:
        slot = self.holder.candidates
        slot.restage(plan, "loading")
        self.rollouts.write_tally(slot.snapshot())
        try:
            version = self.holder.load(plan.candidate)
        except Exception as err:  # reported: the judge rolls the rollout back with it
            self._refused = (plan.id, plan.candidate)
            slot.restage(plan, "refused", f"{type(err).__name__}: {err}")
            return
        slot.hold(plan, version)

    def _drop(self) -> None:
        dropped = self.holder.candidates.drop()
        served = self.versions.served() if self.versions.served else None
        if dropped is not None and (served is None or dropped.tag != served.tag):
            self.versions.watch_release(dropped)  # the heap refrozen once its last request is done


def follow_rollouts(holder, versions: VersionFollower, control: ControlDir, expected_workers: int,
                    timeout_s: float) -> RolloutFollower:
    """This worker's part in rollouts from now on: following the plan on each poll of `versions`, and
    a judge thread (promotions are moves of `expected_workers`, each given `timeout_s`)."""
    rollouts = RolloutDir(control)
    follower = RolloutFollower(rollouts, holder, versions)
    versions.also.append(follower.poll_once)

    def promote(plan: Plan) -> str:
        try:
            with control.exclusive_move(plan.candidate):
                result = move_all(control, plan.candidate, plan.served, expected_workers, timeout_s)
        except Refusal as refusal:
            return refusal.detail
        return "" if result.moved else result.detail

    judge = Judge(rollouts, expected_workers, promote,
                  on_decision=lambda decision: holder.metrics.rollout_decisions.labels(decision).inc())
    threading.Thread(target=_judging, args=(judge,), name="rollout-judge", daemon=True).start()
    return follower


def _judging(judge: Judge) -> None:
    lower_this_thread()
    while True:
        time.sleep(JUDGE_SECONDS)
        try:
            judge.once()
        except Exception as err:  # noqa: BLE001 -- logged; the next look may do better
            log.exception("rollout judge: %s", err)
