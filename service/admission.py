"""Admission control: refuse at the door what would miss the latency budget.

BentoML's dispatcher sheds requests it predicts will miss max_latency_ms, but
only once they reach it -- after their images were read and decoded. Under a
flood that work alone starves the model of CPU. This check runs before any
decoding: with `inflight` images admitted and the model measured at `rate`
images/s, a new request would be answered in about (inflight + n) / rate
seconds; over budget, it gets a 503 at once.

`rate` is the model's own best recent speed: images per second of forward
pass, as a maximum that decays by 5% a batch. Best, because a queue is drained in
big batches, which run faster per image than the small ones seen at low load;
the model's speed rather than the service's throughput, because throughput
sinks when clients are few or when refusals eat CPU, and an estimate that
followed it would refuse more, measure less and spiral down under a retry
storm (seen here before this design).
"""

from __future__ import annotations

import threading


class Admission:
    DECAY = 0.95  # per observed batch

    def __init__(self, budget_seconds: float, initial_rate: float):
        self.budget_seconds = budget_seconds
        self.rate = max(initial_rate, 1e-3)
        self.inflight = 0
        self._lock = threading.Lock()

    def try_admit(self, images: int) -> bool:
        with self._lock:
            # An idle service takes any request, however large, so nothing is refused forever.
            if self.inflight > 0 and (self.inflight + images) / self.rate > self.budget_seconds:
                return False
            self.inflight += images
            return True

    def full(self) -> bool:
        """Would even a one-image request be refused now? (Checked before the body is read.)"""
        return self.inflight > 0 and (self.inflight + 1) / self.rate > self.budget_seconds

    def load(self) -> float:
        """Seconds to answer what is admitted, as a fraction of the budget: 1.0 is full (new requests
        are refused). The one number that says how busy an instance is whatever its speed: the
        autoscaler's metric (deploy/kubernetes)."""
        return self.inflight / self.rate / self.budget_seconds

    def release(self, images: int) -> None:
        with self._lock:
            self.inflight -= images

    def observe(self, images: int, forward_seconds: float) -> None:
        """Fold in one forward pass: `images` in `forward_seconds`."""
        if forward_seconds > 0:
            with self._lock:
                # Decays by half in about 14 batches: one slow batch barely moves it, while
                # a machine slowed for seconds (other load on its cores) is followed.
                self.rate = max(images / forward_seconds, self.rate * self.DECAY)
