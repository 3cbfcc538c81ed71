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

A job that waited past `max_latency_s` before its batch started is refused
(503 overloaded) instead of run late: admission control (service.admission)
keeps that rare, this is the backstop.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.errors import Refusal


@dataclass
class _Job:
    images: np.ndarray  # uint8 (k, S, S, 3)
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """`await submit(images)` -> whatever `await forward(batch)` gives for those rows.

    `forward(batch)` takes a uint8 (N, S, S, 3) array and returns an object
    `split(result, start, stop)` can slice per job; `parallel` batches are in
    flight at a time (1 for a model in this process: one forward owns every
    core). `observe(images, result)` hears about every batch (metrics, admission)."""

    def __init__(self, forward: Callable, split: Callable, max_batch_size: int, max_latency_s: float,
                 parallel: int = 1, observe: Callable | None = None):
        self.forward, self.split = forward, split
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.parallel = parallel
        self.observe = observe or (lambda images, result: None)
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []

    async def submit(self, images: np.ndarray):
        loop = asyncio.get_running_loop()
        if not self._workers:  # started in the serving event loop, on first use
            self._wake = asyncio.Event()
            self._workers = [loop.create_task(self._run()) for _ in range(self.parallel)]
        job = _Job(images, loop.create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

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
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = self._next_batch()
            if not jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = jobs[0].images if len(jobs) == 1 else np.concatenate([job.images for job in jobs])
            try:
                result = await self.forward(batch)
            except Exception as err:  # a failed forward fails its own jobs, never the batcher
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self.observe(len(batch), result)
            offset = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(self.split(result, offset, offset + len(job.images)))
                offset += len(job.images)
