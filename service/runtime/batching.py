"""Dynamic batching in one process: concurrent requests share forward passes.

The rule (the one Triton's dynamic batcher follows with no queue delay): when
the model is free, run everything that is waiting, up to max_batch_size
images, at once. A lone request never waits for company; under load the
queue that builds during one forward pass becomes the next batch, so batches
grow exactly as fast as requests arrive. A job (one request's images) is
never split, and jobs run in arrival order.

Why our own: in one process a request's images only need to move from the
event loop to the forward thread. BentoML's batching is for requests that
arrive over HTTP at a batchable API, and reaching it from inside the same
process needs its private internals. In the split layout each API worker
batches its own requests with this before calling the model service, whose
BentoML batching then merges the API workers' batches: one call between
processes per batch instead of per request (that hop costs about 1.5
core-ms a call here; BENCHMARKS.md).

When the queue is deep, though, the next batch waits a moment for images on
their way. On a CPU the forward's cost per image falls with the batch
(AlexNet in bf16 on 2 cores: 3.8 core-ms per image at batch 8, 2.3 at 32;
fp32: 15.0 and 9.8; BENCHMARKS.md), and taking whatever happens to be queued
when the model frees up left the batches at 7 images on average at 32 clients:
the images still being decoded, and the clients whose answers had just gone
out, missed each batch. So when the model is free and what is queued is
short of a full batch, the batcher waits for more, up to a *target*: the
images queued and announced as on their way (`expecting`: admitted,
decoding), or, if more, as many as were queued and running at once in the
last second -- the load a deep queue has shown it sustains, closed-loop
clients whose answers just went out among it. It waits at most as long as a
forward pass of the target takes (`gather_s` overrides; never more than a
quarter of the latency budget). The cores are not idle meanwhile: they
decode the images awaited, and answer the last batch's requests. A lone
client is never more than one image present, so it never waits.

A job that waited past `max_latency_s` before its batch started is refused
(503 overloaded) instead of run late: admission control (service.runtime.admission)
keeps that rare, this is the backstop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.core import tracing
from service.core.refusals import Refusal
from service.core.timeline import Timeline
from service.core.timeline import current as timeline_now


@dataclass
class _Job:
    images: np.ndarray  # uint8 (k, S, S, 3)
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)
    timeline: Timeline | None = field(default_factory=timeline_now)  # its request's (service.core.timeline)


class _WindowMax:
    """The largest value recorded in the last `seconds` (a monotonic deque: O(1) per record)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def record(self, now: float, value: int) -> None:
        while self._samples and self._samples[-1][1] <= value:
            self._samples.pop()
        self._samples.append((now, value))

    def peak(self, now: float) -> int:
        while self._samples and now - self._samples[0][0] > self.seconds:
            self._samples.popleft()
        return self._samples[0][1] if self._samples else 0


@dataclass(frozen=True)
class BatchPolicy:
    """How the batcher forms batches: at most `max_batch_size` images each; a job older than
    `max_latency_s` is answered with a timeout instead of computed; `parallel` batches are in flight
    at a time (1 for a model in this process: one forward owns every core); `gather_s`: the longest a
    batch waits for more images (None: as long as a forward pass of the target has been taking)."""
    max_batch_size: int
    max_latency_s: float
    parallel: int = 1
    gather_s: float | None = None


class Batcher:
    """`await submit(images)` -> whatever `await forward(batch)` gives for those rows.

    `forward(batch)` takes a uint8 (N, S, S, 3) array and returns an object
    `split(result, start, stop)` can slice per job; `policy` says how batches
    form (BatchPolicy). `observe(images, result)` hears about every batch
    (metrics, admission)."""

    PEAK_WINDOW_S = 1.0  # how far back "as many as were present at once" looks

    def __init__(self, forward: Callable, split: Callable, policy: BatchPolicy, observe: Callable | None = None):
        self.forward, self.split = forward, split
        self.policy = policy
        self.max_batch_size, self.max_latency_s = policy.max_batch_size, policy.max_latency_s
        self.observe = observe or (lambda images, result: None)
        self.coming = 0  # images admitted and on their way (decoding), not yet submitted
        self.forward_s_per_image = 0.0  # the batches' wall time per image, smoothed: how long to wait for more
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._running = 0  # images in batches being computed
        self._last_job = 0  # images in the last job submitted
        self._present = _WindowMax(self.PEAK_WINDOW_S)  # queued + running: its recent peak
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []

    @property
    def queued(self) -> int:
        """Images waiting for a batch (the queue's depth)."""
        return self._queued_images

    @contextlib.contextmanager
    def expecting(self, images: int):
        """Announce `images` that will be submitted once decoded (submit them right after the block,
        with no await between), so that a batch may wait for them; withdrawn when the block ends,
        whether or not they come (a request refused while decoding)."""
        self.coming += images
        try:
            yield
        finally:
            self.coming -= images
            if self._wake is not None:
                self._wake.set()  # a batch waiting for these need not wait any longer

    async def submit(self, images: np.ndarray):
        loop = asyncio.get_running_loop()
        if not self._workers:  # started in the serving event loop, on first use
            self._wake = asyncio.Event()
            # In a context of their own: a task copies its creator's, which here is one request's (its
            # timeline and span would follow every batch).
            self._workers = [loop.create_task(self._run(), context=contextvars.Context())
                             for _ in range(self.policy.parallel)]
        job = _Job(images, loop.create_future())
        self._queue.append(job)
        self._queued_images += len(images)
        self._last_job = len(images)
        self._note_present()
        self._wake.set()
        return await job.future

    def _note_present(self) -> None:
        self._present.record(time.perf_counter(), self._queued_images + self._running)

    def target(self) -> int:
        """The images the next batch waits for: those queued and on their way, or, if more, the recent
        peak of images queued and running at once (less what is running now: those clients come back
        only after it), up to a full batch."""
        expected = max(self._queued_images + self.coming,
                       self._present.peak(time.perf_counter()) - self._running)
        return min(self.max_batch_size, expected)

    async def _gather(self) -> None:
        """Wait (at most gather_s) while what is queued is short of the target."""
        deadline = None
        while True:
            queued = self._queued_images
            target = self.target()
            # Jobs are not split: once the last one would not have fitted, neither will the next.
            if not queued or queued >= target or queued + self._last_job > self.max_batch_size:
                return
            now = time.perf_counter()
            if deadline is None:
                limit = self.policy.gather_s if self.policy.gather_s is not None else self.forward_s_per_image * target
                deadline = now + min(limit, self.max_latency_s / 4)
            if now >= deadline:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), deadline - now)
            except TimeoutError:
                return

    def _next_batch(self) -> list[_Job]:
        jobs, size = [], 0
        now = time.perf_counter()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away
                self._queue.popleft()
                continue
            if now - job.queued_at > self.max_latency_s:
                self._queue.popleft()
                job.future.set_exception(Refusal(503, "overloaded", "waited past the latency budget; retry shortly"))
                continue
            if jobs and size + len(job.images) > self.max_batch_size:
                break
            jobs.append(self._queue.popleft())
            size += len(job.images)
        self._queued_images = sum(len(job.images) for job in self._queue)
        return jobs

    async def _run(self) -> None:
        while True:
            await self._gather()
            if not self._queued_images:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = self._next_batch()
            if jobs:
                await self._run_batch(jobs)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        batch = jobs[0].images if len(jobs) == 1 else np.concatenate([job.images for job in jobs])
        started = time.perf_counter()
        self._running += len(batch)
        try:
            with tracing.batch([job.timeline for job in jobs if job.timeline is not None], len(batch)):
                result = await self.forward(batch)
        except Exception as err:  # a failed forward fails its own jobs, never the batcher
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self._running -= len(batch)
        ended = time.perf_counter()
        for job in jobs:  # each request's wait for its batch, and the batch's forward it shared
            if job.timeline is not None:
                job.timeline.record("batch_wait", job.queued_at, started)
                job.timeline.record("forward", started, ended)
                job.timeline.batch_sizes.append(len(batch))
        per_image = (ended - started) / len(batch)
        self.forward_s_per_image = (per_image if not self.forward_s_per_image
                                    else 0.8 * self.forward_s_per_image + 0.2 * per_image)
        self.observe(len(batch), result)
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(self.split(result, offset, offset + len(job.images)))
            offset += len(job.images)
