"""Admission control: refuse at the door what would miss the latency budget.

BentoML's dispatcher sheds requests it predicts will miss max_latency_ms, but
only once they reach it -- after their images were read and decoded, and
sometimes after waiting. Under a flood that work alone starves the model of
CPU. This check runs before any decoding: with `inflight` images admitted and
the service measured at `rate` images/s, a new request would be answered in
about (inflight + n) / rate seconds; over budget, it gets a 503 at once.

`rate` is what the whole service delivers while busy (images finished per
second of wall time with work in flight) -- decoding, HTTP and the forward
pass together, under whatever CPU contention there is -- smoothed over
one-second windows. It starts from a warm-up measurement of the bare model.
"""

from __future__ import annotations

import threading
import time

WINDOW_SECONDS = 1.0


class Admission:
    def __init__(self, budget_seconds: float, initial_rate: float, clock=time.monotonic):
        self.budget_seconds = budget_seconds
        self.rate = max(initial_rate, 1e-3)
        self.inflight = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._window_busy = 0.0
        self._window_done = 0

    def try_admit(self, images: int) -> bool:
        with self._lock:
            # An idle service takes any request, however large, so nothing is refused forever.
            if self.inflight > 0 and (self.inflight + images) / self.rate > self.budget_seconds:
                return False
            if self.inflight == 0:
                self._busy_since = self._clock()
            self.inflight += images
            return True

    def full(self) -> bool:
        """Would even a one-image request be refused now? (Checked before the body is read.)"""
        return self.inflight > 0 and (self.inflight + 1) / self.rate > self.budget_seconds

    def release(self, images: int, completed: bool = True) -> None:
        with self._lock:
            self.inflight -= images
            if completed:
                self._window_done += images
            now = self._clock()
            if self._busy_since is not None:
                self._window_busy += now - self._busy_since
                self._busy_since = now if self.inflight > 0 else None
            if self._window_busy >= WINDOW_SECONDS and self._window_done:
                measured = self._window_done / self._window_busy
                self.rate = 0.5 * self.rate + 0.5 * measured
                self._window_busy, self._window_done = 0.0, 0
