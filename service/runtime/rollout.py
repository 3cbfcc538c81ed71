"""A worker's part in a rollout (service.control.rollout) on the request path: the candidate it holds beside
its version, which requests the candidate answers (canary) or also computes (shadow), and the tally.

  canary   a client is in the candidate's share when the hash of (rollout, client) falls below it: sticky
           for the whole rollout, and a client in at 5% stays in at 25%. The client is its X-Client-Id
           header, else its address (service.http.observe puts it on the request's timeline).
  shadow   after the served answer is in, that share of requests is submitted again, to the candidate's
           batcher, in a task of its own: the answer does not wait for it. Its batches run at the lowest
           CPU priority in this layout (the model worker's threads in the split one), and at most a full
           batch of shadow images is in flight per worker: beyond that, shadow work is dropped, and
           counted, before anything is refused.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import os
import random
import threading
import time

import numpy as np

from service.control.rollout import Plan, Tally
from service.core import timeline
from service.core.refusals import refusal_for


def bucket(rollout: str, client: str) -> float:
    """Where a client falls in [0, 1) for a rollout: the same every time."""
    digest = hashlib.blake2b(f"{rollout}\0{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class CandidateHolder:
    """The candidate a worker holds beside its version, the rollout's plan and this worker's tally of its
    stage. Changed by the follower thread (service.control.rollout_follower), read by requests: each
    field is replaced in one assignment. `install(version)` hands the candidate to what runs it (the
    backend), None to drop it."""

    def __init__(self, install=lambda version: None):
        self.install = install
        self.plan: Plan | None = None
        self.candidate = None
        self.tally = Tally(pid=os.getpid())
        self.lock = threading.Lock()

    def restage(self, plan: Plan, state: str | None = None, error: str = "") -> None:
        """Follow the plan: a new stage starts a new tally."""
        with self.lock:
            if (self.tally.rollout, self.tally.stage) != (plan.id, plan.stage):
                self.tally = Tally(stage=plan.stage, rollout=plan.id, pid=os.getpid(),
                                   candidate=self.tally.candidate, candidate_state=self.tally.candidate_state)
            if state is not None:
                self.tally.candidate, self.tally.candidate_state, self.tally.error = plan.candidate, state, error
        self.plan = plan

    def hold(self, plan: Plan, version) -> None:
        self.install(version)
        self.candidate = version
        self.restage(plan, "ready")

    def drop(self):
        """No candidate any more; the one dropped, if any."""
        dropped, self.candidate, self.plan = self.candidate, None, None
        self.install(None)
        with self.lock:
            self.tally = Tally(pid=os.getpid())
        return dropped

    def snapshot(self) -> Tally:
        with self.lock:
            return dataclasses.replace(self.tally, served_latency=list(self.tally.served_latency),
                                       candidate_latency=list(self.tally.candidate_latency))


class RolloutSide(CandidateHolder):
    """An API worker's: routes each prediction, runs the shadow comparisons, counts the stage."""

    def __init__(self, backend, metrics, max_shadow_images: int):
        super().__init__(backend.hold_candidate)
        self.backend, self.metrics = backend, metrics
        self.max_shadow_images = max_shadow_images
        self._shadow_images = 0
        self._tasks: set[asyncio.Task] = set()

    def _canary(self, plan: Plan | None) -> bool:
        if plan is None or plan.mode != "canary" or self.candidate is None:
            return False
        request = timeline.current()
        return bucket(plan.id, request.client if request is not None else "") < plan.share

    async def predict(self, pixels: np.ndarray):
        """The pixels through the model: the served version, or the candidate for a canary's clients;
        a shadow's share of them to the candidate too, after the answer is in."""
        plan = self.plan
        canary = self._canary(plan)
        started = time.perf_counter()
        try:
            predicted = await self.backend.predict(pixels, "canary" if canary else "served")
        except Exception as err:
            self._count(plan, canary, time.perf_counter() - started, failed=_is_fault(err))
            raise
        self._count(plan, canary and predicted.version.tag == plan.candidate, time.perf_counter() - started)
        if plan is not None and plan.mode == "shadow" and self.candidate is not None and random.random() < plan.share:
            self._shadow(plan, pixels, predicted.probabilities)
        return predicted

    def _count(self, plan: Plan | None, candidate: bool, seconds: float, failed: bool = False) -> None:
        if plan is None:
            return
        with self.lock:
            tally = self.tally
            if (tally.rollout, tally.stage) != (plan.id, plan.stage):
                return
            if candidate:
                tally.candidate_requests += 1
                tally.candidate_errors += failed
            else:
                tally.served_requests += 1
                tally.served_errors += failed
            tally.add_latency(candidate, seconds)
        role = "candidate" if candidate else "served"
        self.metrics.rollout_requests.labels(plan.served, plan.candidate, plan.mode, role,
                                             "error" if failed else "ok").inc()
        self.metrics.rollout_seconds.labels(plan.served, plan.candidate, plan.mode, role).observe(seconds)

    def _shadow(self, plan: Plan, pixels: np.ndarray, served: np.ndarray) -> None:
        images = len(pixels)
        if self._shadow_images + images > self.max_shadow_images:  # shadow work is the first to go
            self._tally_shadow(plan, dropped=images)
            return
        self._shadow_images += images
        # a context of its own: the request's (its timeline, its pinned version) ends with its answer
        task = asyncio.get_running_loop().create_task(self._compare(plan, pixels, served),
                                                      context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, plan: Plan, pixels: np.ndarray, served: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            shadow = await self.backend.predict(pixels, "shadow")
        except Exception:  # noqa: BLE001 -- off the answer path: the comparison is lost, and counted
            self._tally_shadow(plan, dropped=len(pixels))
            return
        finally:
            self._shadow_images -= len(pixels)
        if shadow.version.tag != plan.candidate:  # the candidate was dropped meanwhile
            self._tally_shadow(plan, dropped=len(pixels))
            return
        candidate = shadow.probabilities
        agreed = int((served.argmax(axis=1) == candidate.argmax(axis=1)).sum())
        shifts = 0.5 * np.abs(served.astype(np.float64) - candidate).sum(axis=1)  # total-variation distance
        self._tally_shadow(plan, compared=len(pixels), agreed=agreed, shifts=shifts,
                           seconds=time.perf_counter() - started)

    def _tally_shadow(self, plan: Plan, compared: int = 0, agreed: int = 0, shifts=(), dropped: int = 0,
                      seconds: float | None = None) -> None:
        with self.lock:
            tally = self.tally
            if (tally.rollout, tally.stage) != (plan.id, plan.stage):
                return
            tally.compared += compared
            tally.agreed += agreed
            tally.shift_sum += float(np.sum(shifts))
            tally.dropped += dropped
            if seconds is not None:
                tally.add_latency(True, seconds)
        metrics, pair = self.metrics, (plan.served, plan.candidate)
        for outcome, count in (("agreed", agreed), ("disagreed", compared - agreed), ("dropped", dropped)):
            if count:
                metrics.rollout_shadow_images.labels(*pair, outcome).inc(count)
        for shift in shifts:
            metrics.rollout_shift.labels(*pair).observe(float(shift))
        if seconds is not None:
            metrics.rollout_seconds.labels(*pair, "shadow", "candidate").observe(seconds)


def _is_fault(err: Exception) -> bool:
    """A failure the version is to blame for: anything but a refusal of the request or of the load."""
    refusal = refusal_for(err, 1)
    return refusal is None or (refusal.status >= 500 and refusal.reason != "overloaded")
