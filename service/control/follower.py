"""A worker's side of a model move: watch the order in the control directory, and move when it changes.

Every worker that holds the model (the API workers of the single layout; the
model workers of the split layout, whose API workers follow with the model's
shape) loads the ordered version beside the old one, verifies it, checks it,
warms it up, then swaps in one step (one attribute assignment). A batch is
run by whichever version was current when it started, and carries that
version to the answer; the old version is freed when the last request using
it finishes, and then the worker's heap is frozen again
(service.core.heap.settle_heap), as start-up froze it. A worker (re)started
later reads the order and serves its version from the start, so a restarted
worker does not bring the old model back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Callable

from service.control.control_dir import ControlDir, WorkerStatus
from service.core.heap import settle_heap
from service.core.priority import lower_this_thread

POLL_SECONDS = 0.2  # how often a worker looks for a new order: the swap's latency, for a stat() call
RELEASE_WAIT_S = 30.0  # how long a worker waits for the requests still on the old version before refreezing

log = logging.getLogger(__name__)


class VersionFollower:
    """A worker's side: watch the order, and move when it changes.

    `load(tag)` builds the new version beside the old one (verifying, checking, warming; raising
    on any problem); `install(version)` swaps it in, in one step; `served()` (optional) is the
    version served now, so that the heap can be frozen again once the old one is released."""

    def __init__(self, control: ControlDir, role: str, tag: str, load: Callable[[str], Any],
                 install: Callable[[Any], None], served: Callable[[], Any] | None = None):
        self.control, self.role, self.tag = control, role, tag
        self.load, self.install, self.served = load, install, served
        self.generation = 0
        self.pid = os.getpid()  # whose report this is
        self._lock = threading.Lock()
        self._released: list[Callable[[], Any]] = []  # weak refs to the versions moved away from, until freed
        self._settle_by = 0.0  # when to refreeze even if one of them is still alive
        self.on_result: Callable[[str, float], None] = lambda result, seconds: None
        self.on_settled: Callable[[str, float], None] = _log_settled
        self.on_error: Callable[[BaseException], None] = lambda err: None  # counted by the service
        self.also: list[Callable[[], None]] = []  # looked at on each poll too, after the order (rollouts)

    def start(self) -> None:
        """Act on an order already there (a worker restarted after a move), then follow in a thread."""
        self.step()
        if self.generation == 0:
            self.control.report(self._status("serving"))
        threading.Thread(target=self._follow, name="model-version-follower", daemon=True).start()

    def _follow(self) -> None:
        # The lowest CPU priority for this thread, and the threads it starts (torch's intra-op threads
        # of the new version's warm-up inherit it): a move must not take the cores from the requests
        # being served meanwhile, or admission control would refuse some of them (seen in bf16 at 16
        # users without it: a few 503s per move).
        lower_this_thread()
        while True:
            time.sleep(POLL_SECONDS)
            self.poll_once()

    def poll_once(self) -> None:
        """One look at the order (and at the old version's release). An error -- an unreadable control
        directory, a report that cannot be written -- is logged and counted, and the follower goes on:
        the next order must still be heard."""
        try:
            self.step()
            for look in self.also:
                look()
            self.settle()
        except Exception as err:  # noqa: BLE001 -- logged and counted, never silent
            log.exception("model version follower (pid %d): %s", self.pid, err)
            self.on_error(err)

    def settle(self) -> str | None:
        """After a move, once the old version is freed (its last request done) or RELEASE_WAIT_S has
        passed: freeze the heap again (settle_heap). Returns how, or None while still waiting."""
        if not self._released:
            return None
        if any(ref() is not None for ref in self._released) and time.monotonic() < self._settle_by:
            return None
        started = time.perf_counter()
        how = settle_heap(released=all(ref() is None for ref in self._released))
        self._released = []
        self.on_settled(how, time.perf_counter() - started)
        return how

    def step(self) -> None:
        with self._lock:
            order = self.control.order()
            if order is None or order["generation"] == self.generation:
                return
            started = time.perf_counter()
            state, error = "serving", ""
            if order["tag"] != self.tag:
                try:
                    version = self.load(order["tag"])
                    old = self.served() if self.served else None
                    self.install(version)
                    del version
                    self.tag = order["tag"]
                    self.watch_release(old)
                except Exception as err:  # the old version keeps serving
                    state, error = "refused", f"{type(err).__name__}: {err}"
                self.on_result("ok" if state == "serving" else "refused", time.perf_counter() - started)
            self.generation = order["generation"]
            self.control.report(self._status(state, error, time.perf_counter() - started))

    def watch_release(self, old: Any) -> None:
        """Remember a version moved away from (or a rollout's candidate dropped), weakly, by what is heavy
        in it: its predictor. A version without one (the split layout's API workers, which keep recent
        versions known on purpose, service.runtime.backend.RemoteBackend) is not waited for."""
        heavy = getattr(old, "predictor", None)
        self._released.append(weakref.ref(heavy) if heavy is not None else lambda: None)
        self._settle_by = time.monotonic() + RELEASE_WAIT_S

    def _status(self, state: str, error: str = "", seconds: float = 0.0) -> WorkerStatus:
        return WorkerStatus(self.pid, self.role, self.tag, self.generation, state, error, round(seconds, 3))


def _log_settled(how: str, seconds: float) -> None:
    print(f"model version follower (pid {os.getpid()}): heap settled after the move ({how}, {seconds:.3f} s)",
          flush=True)


def follow_versions(holder, role: str, tag: str, control: ControlDir | None = None) -> VersionFollower:
    """Follow this server's orders (in `control`, by default this server's) from now on: `holder.load(tag)`
    builds a version beside the served one, `holder.install(version)` swaps it in,
    `holder.metrics.observe_swap(result, seconds)` counts moves; the served version is
    `holder.backend.current` (the API service) or `holder.current` (the model service)."""
    def served():
        return getattr(holder, "backend", holder).current

    follower = VersionFollower(control or ControlDir.for_this_server(), role, tag, holder.load, holder.install, served)
    follower.on_result = holder.metrics.observe_swap
    follower.on_error = lambda err: holder.metrics.follower_errors.labels(type(err).__name__).inc()
    follower.start()
    return follower
