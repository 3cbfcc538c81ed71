"""A rollout's judgement (service.control.rollout) on its own: the gates, the judge's decisions over real
files in a control directory, and the canary's buckets."""

from __future__ import annotations

import os

import pytest

from service.control.control_dir import ControlDir
from service.control.rollout import Gates, Judge, Plan, RolloutDir, Tally, judge, numbers
from service.runtime.rollout import bucket


def _plan(mode: str = "shadow", promote: bool = True, **gates) -> Plan:
    return Plan("m:candidate", "m:served", mode, 0.5, Gates(**gates), promote)


def _tally(plan: Plan, **counts) -> Tally:
    return Tally(stage=plan.stage, rollout=plan.id, pid=os.getpid(), candidate=plan.candidate,
                 candidate_state="ready", **counts)


def test_a_shadow_stage_waits_for_its_requests_then_holds_agreement_and_shift_to_their_gates():
    plan = _plan(min_requests=100, min_agreement=0.9, max_shift=0.2)
    assert judge(plan, numbers([_tally(plan, compared=99, agreed=99)]))[0] == "wait"
    assert judge(plan, numbers([_tally(plan, compared=60, agreed=55, shift_sum=3.0),
                                _tally(plan, compared=40, agreed=36, shift_sum=2.0)]))[0] == "pass"
    verdict, gates = judge(plan, numbers([_tally(plan, compared=100, agreed=89)]))
    assert verdict == "fail" and [g["gate"] for g in gates if not g["passed"]] == ["min_agreement"]
    verdict, gates = judge(plan, numbers([_tally(plan, compared=100, agreed=100, shift_sum=30.0)]))
    assert verdict == "fail" and [g["gate"] for g in gates if not g["passed"]] == ["max_shift"]


def test_a_canary_stage_holds_errors_and_p99_against_the_served_version_or_the_last_stages():
    plan = _plan("canary", min_requests=10, max_error_increase=0.05, max_p99_ratio=1.5)
    served = {"served_requests": 100, "served_latency": [0.010] * 100}
    good = _tally(plan, candidate_requests=10, candidate_latency=[0.012] * 10, **served)
    assert judge(plan, numbers([good]))[0] == "pass"
    slow = _tally(plan, candidate_requests=10, candidate_latency=[0.012] * 9 + [0.020], **served)
    assert judge(plan, numbers([slow]))[0] == "fail"
    failing = _tally(plan, candidate_requests=10, candidate_errors=1, candidate_latency=[0.01] * 10, **served)
    assert judge(plan, numbers([failing]))[0] == "fail"
    alone = _tally(plan, candidate_requests=10, candidate_latency=[0.012] * 10)  # a share of 100%
    assert judge(plan, numbers([alone]))[0] == "fail"  # nothing to compare with: not a pass
    plan.baseline = {"served_error_rate": 0.0, "served_p99_s": 0.010}
    assert judge(plan, numbers([alone]))[0] == "pass"


def test_gates_are_checked_when_asked_for():
    assert Gates.parse({"min_requests": 5}).min_requests == 5
    with pytest.raises(ValueError, match="unknown gates"):
        Gates.parse({"min_accuracy": 0.9})
    with pytest.raises(ValueError):
        Gates.parse({"min_agreement": 1.5})


def test_the_judge_rolls_back_a_refused_candidate_and_promotes_a_passing_last_stage(tmp_path):
    rollouts = RolloutDir(ControlDir(tmp_path))
    promoted, decisions = [], []
    judge_ = Judge(rollouts, 1, lambda plan: promoted.append(plan.candidate) or "", decisions.append)
    plan = _plan(min_requests=10)
    rollouts.write_plan(plan)
    assert judge_.once() is None  # no tally yet: waits
    rollouts.write_tally(_tally(plan, compared=10, agreed=10))
    assert judge_.once() == "promoted" and promoted == ["m:candidate"]
    assert rollouts.plan().state == "promoted" and decisions == ["promoted"]

    held = _plan(promote=False, min_requests=10)
    rollouts.write_plan(held)
    rollouts.write_tally(_tally(held, compared=10, agreed=10))
    assert judge_.once() == "passed" and rollouts.plan().state == "passed"
    assert judge_.once() is None  # a passed stage waits for its next one

    refused = _plan()
    rollouts.write_plan(refused)
    rollouts.write_tally(Tally(stage=1, rollout=refused.id, pid=os.getpid(), candidate=refused.candidate,
                               candidate_state="refused", error="RuntimeError: out of memory"))
    assert judge_.once() == "rolled_back"
    assert "out of memory" in rollouts.plan().reason and decisions[-1] == "rolled_back"


def test_a_failed_promotion_rolls_back_with_why(tmp_path):
    rollouts = RolloutDir(ControlDir(tmp_path))
    plan = _plan(min_requests=1)
    rollouts.write_plan(plan)
    rollouts.write_tally(_tally(plan, compared=1, agreed=1))
    assert Judge(rollouts, 1, lambda plan: "worker 7 refused").once() == "rolled_back"
    assert rollouts.plan().reason == "the promotion failed: worker 7 refused"


def test_canary_buckets_are_sticky_uniform_and_nested_across_shares():
    clients = [f"client-{i}" for i in range(4000)]
    first = [bucket("r1", c) for c in clients]
    assert first == [bucket("r1", c) for c in clients]  # sticky
    assert abs(sum(b < 0.25 for b in first) / len(clients) - 0.25) < 0.03  # uniform enough
    assert all(b < 0.5 for b in first if b < 0.25)  # in at 25% stays in at 50%
    assert [bucket("r2", c) for c in clients] != first  # another rollout, other buckets
