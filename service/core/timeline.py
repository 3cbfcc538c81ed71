"""Where a request's time goes: the stages it passed through, recorded once and read three ways --
the latency-breakdown histograms, the trace's spans and the access log line.

A `Timeline` is opened by the outermost guard (service.http.observe) for every request it observes and
found by the code of each stage through a context variable, as the request's task carries it (the
batcher, which runs batches in a task of its own, takes it with each job). A stage records its start
and end on the wall clock of the process (`time.perf_counter`); the timeline turns them into seconds
(metrics, log) or epoch nanoseconds (spans).

The stages, in the order a request meets them:

  admission   waiting at the door for room (service.runtime.admission), before the body is read
  body        reading the request body (the guards read it whole: service.http.guards.LimitBody)
  parse       BentoML parsing the body into the endpoint's arguments (from the body read to the handler)
  decode      decoding the images to the model's input size
  batch_wait  queued for a batch, until the batch it joined started (service.runtime.batching)
  forward     the forward pass of that batch (shared with the other requests in it)
  answer      from the model's result to the last byte of the response: shaping and encoding
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field

STAGES = ("admission", "body", "parse", "decode", "batch_wait", "forward", "answer")


@dataclass
class Timeline:
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    started_ns: int = field(default_factory=time.time_ns)  # the same instant on the epoch clock (spans)
    stages: list[tuple[str, float, float]] = field(default_factory=list)  # (stage, start, end), perf_counter
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    model: str | None = None
    refusal: str | None = None
    client: str = ""  # who asks: its X-Client-Id, else its address (a rollout's canary is sticky per client)
    span_context: object | None = None  # the request's span, where it is traced (batches link to it)
    _answer_from: float | None = None

    def record(self, stage: str, start: float, end: float) -> None:
        self.stages.append((stage, start, end))

    @contextlib.contextmanager
    def stage(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(stage, start, time.perf_counter())

    def answering(self) -> None:
        """The model's result is here: from now on the request is being answered."""
        self._answer_from = time.perf_counter()

    def finish(self, end: float) -> None:
        """The response's last byte is sent: close the answer stage."""
        if self._answer_from is not None:
            self.record("answer", self._answer_from, end)
            self._answer_from = None

    def seconds(self) -> dict[str, float]:
        """Each stage's total seconds (a stage met twice, such as two batches, adds up)."""
        totals: dict[str, float] = {}
        for stage, start, end in self.stages:
            totals[stage] = totals.get(stage, 0.0) + max(0.0, end - start)
        return totals

    def epoch_ns(self, instant: float) -> int:
        """A perf_counter instant of this process on the epoch clock, in nanoseconds (for spans)."""
        return self.started_ns + int((instant - self.started) * 1e9)


CURRENT: contextvars.ContextVar[Timeline | None] = contextvars.ContextVar("cnn_timeline", default=None)


def current() -> Timeline | None:
    return CURRENT.get()


def note_refusal(reason: str) -> None:
    timeline = CURRENT.get()
    if timeline is not None:
        timeline.refusal = reason


@contextlib.contextmanager
def stage(name: str):
    """Record `name` on the current request's timeline, if it has one."""
    timeline = CURRENT.get()
    if timeline is None:
        yield
        return
    with timeline.stage(name):
        yield
