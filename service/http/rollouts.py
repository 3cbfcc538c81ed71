"""The admin calls of a rollout (service.control.rollout), with ADMIN_KEY as moves:

  POST   /admin/rollout {"candidate": TAG, "mode": "shadow"|"canary", "share": 0.1, "gates": {...},
                         "promote": false}
         starts a rollout, or its next stage (the same candidate); answers once every worker holds the
         candidate (200, the rollout's state), or 409 with why one could not (the rollout then rolled
         back). The candidate is checked first as a move checks it: a missing (404), tampered or
         incompatible (422) one is refused before anything changes. 409 rollout_in_progress while
         another candidate's rollout is live.
  GET    /admin/rollout   the plan, its stage's numbers, every gate's verdict, each worker's part
  DELETE /admin/rollout   stop it: answers once every worker is back on its version alone
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import anyio
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.control.moves import check_candidate
from service.control.rollout import Gates, Plan, RolloutDir, state_of
from service.core.refusals import Refusal


class RolloutRequest(BaseModel):
    candidate: str = Field(min_length=1)
    mode: Literal["shadow", "canary"]
    share: float = Field(gt=0, le=1)
    gates: dict = Field(default_factory=dict)
    promote: bool = True  # promote once this stage's gates pass (else hold, "passed", for the next stage)


def _context(request: Request):
    service = request.app.state.running.service
    if service is None:
        raise Refusal(503, "not_ready", "the model is still loading")
    layout = service.layout
    return service, RolloutDir(service.versions.control), layout.api_workers + layout.model_workers


async def rollout_state(request: Request) -> Response:
    try:
        _, rollouts, expected = _context(request)
    except Refusal as refusal:
        return refusal.response()
    return JSONResponse(await anyio.to_thread.run_sync(state_of, rollouts, expected))


async def stop_rollout(request: Request) -> Response:
    try:
        service, rollouts, expected = _context(request)
    except Refusal as refusal:
        return refusal.response()

    def stop() -> Plan | None:
        with rollouts.exclusive():
            plan = rollouts.plan()
            if plan is None or not plan.live:
                return None
            plan.state, plan.reason, plan.decided = "rolled_back", "stopped by the operator", time.time()
            rollouts.write_plan(plan)
            return plan

    plan = await anyio.to_thread.run_sync(stop)
    if plan is not None:
        service.pipeline.metrics.rollout_decisions.labels("stopped").inc()
        await anyio.to_thread.run_sync(_wait_for_drop, rollouts, plan, float(service.config.request_timeout_s))
    return JSONResponse(await anyio.to_thread.run_sync(state_of, rollouts, expected))


async def start_rollout(request: Request) -> Response:
    try:
        service, rollouts, expected = _context(request)
        asked = RolloutRequest.model_validate(await request.json())
        gates = Gates.parse(asked.gates)
    except Refusal as refusal:
        return refusal.response()
    except (ValueError, ValidationError, TypeError) as err:
        return Refusal(400, "invalid_request", f"{err}".splitlines()[0][:300] + ' -- send {"candidate": TAG, '
                       '"mode": "shadow" | "canary", "share": 0.1, "gates": {...}, "promote": true}').response()
    try:
        plan = await anyio.to_thread.run_sync(_publish, rollouts, service, asked, gates)
    except Refusal as refusal:
        return refusal.response()
    timeout_s = float(service.config.request_timeout_s * 4)
    refused = await anyio.to_thread.run_sync(_wait_for_workers, rollouts, plan, expected, timeout_s)
    if refused:
        await anyio.to_thread.run_sync(_roll_back, rollouts, plan, refused)
        service.pipeline.metrics.rollout_decisions.labels("rolled_back").inc()
        body = await anyio.to_thread.run_sync(state_of, rollouts, expected)
        return JSONResponse({"error": "rollout_refused", "detail": refused, **body}, status_code=409)
    return JSONResponse(await anyio.to_thread.run_sync(state_of, rollouts, expected))


def _publish(rollouts: RolloutDir, service, asked: RolloutRequest, gates: Gates) -> Plan:
    """The stage written, under the plan's lock: a new rollout, or the next stage of the live one."""
    with rollouts.exclusive():
        plan = rollouts.plan()
        served = service.pipeline.backend.current
        candidate = check_candidate(asked.candidate, served.manifest)
        if candidate == served.tag:
            raise Refusal(409, "already_served", f"{candidate} is the version served")
        if plan is not None and plan.live and plan.candidate != candidate:
            raise Refusal(409, "rollout_in_progress", f"a rollout of {plan.candidate} is {plan.state}; stop it "
                          "first (DELETE /admin/rollout) or let it end")
        if plan is not None and plan.live:
            plan = dataclasses.replace(plan, mode=asked.mode, share=asked.share, gates=gates, promote=asked.promote,
                                       stage=plan.stage + 1, state="running", reason="", started=time.time())
        else:
            plan = Plan(candidate, served.tag, asked.mode, asked.share, gates, asked.promote)
        rollouts.write_plan(plan)
        return plan


def _wait_for_workers(rollouts: RolloutDir, plan: Plan, expected: int, timeout_s: float) -> str:
    """Until every worker holds the candidate for this stage; "" then, else what went wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        tallies = rollouts.tallies(plan)
        refused = [t for t in tallies if t.candidate_state == "refused"]
        if refused:
            return f"worker {refused[0].pid} could not load {plan.candidate}: {refused[0].error}"
        if sum(t.candidate_state == "ready" for t in tallies) >= expected:
            return ""
        if time.monotonic() > deadline:
            return f"only {len(tallies)} of {expected} workers took up {plan.candidate} within {timeout_s:.0f} s"
        time.sleep(0.1)


def _wait_for_drop(rollouts: RolloutDir, plan: Plan, timeout_s: float) -> None:
    """Until no worker holds the candidate any more (each drops it on its next poll), or `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(t.candidate_state == "ready" for t in rollouts.tallies(plan)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _roll_back(rollouts: RolloutDir, plan: Plan, reason: str) -> None:
    with rollouts.exclusive():
        now = rollouts.plan()
        if now is not None and now.id == plan.id and now.live:
            now.state, now.reason, now.decided = "rolled_back", reason, time.time()
            rollouts.write_plan(now)
