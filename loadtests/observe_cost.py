"""What observing a request costs the server's CPU with traces off: the outermost guard
(service.http.observe), the request's timeline and the latency-breakdown metrics, per request.

    python -m loadtests.observe_cost [--requests 20000]

Runs the real ObserveRequests around a bare ASGI app that records a /classify's stages (decode,
batch_wait, forward, answer) and answers at once, with the service's real metrics in prometheus_client's
multiprocess mode (as BentoML's workers run them), against the same app unwrapped; prints the CPU time
(process time) per request of each and the difference, three rounds. Set it beside the server's CPU per
image (`python -m loadtests.bench`, BENCHMARKS.md) for its share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time


def _apps():
    from service.core import timeline
    from service.core.metrics import ServiceMetrics
    from service.core.running import Running
    from service.http.observe import ObserveRequests

    class Pipeline:  # what the guard reads of the worker's pipeline: its metrics and its batcher's queue
        def __init__(self):
            self.metrics = ServiceMetrics("cpu")
            self.backend = type("Backend", (), {"batcher": type("Batcher", (), {"queued": 0})()})()
            self.precision_name = "bf16"

    async def app(scope, receive, send):
        await receive()
        request = timeline.current()
        if request is not None:
            for stage in ("decode", "batch_wait", "forward"):
                with timeline.stage(stage):
                    pass
            request.answering()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    running = Running()
    running.service = type("Service", (), {"pipeline": Pipeline()})()
    return app, ObserveRequests(app, running, access_log=False)


async def _cpu_per_request(app, requests: int) -> float:
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive():
        return {"type": "http.request", "body": b"x" * 100, "more_body": False}

    async def send(message):
        pass

    start = time.process_time()
    for _ in range(requests):
        await app(scope, receive, send)
    return (time.process_time() - start) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.observe_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args(argv)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="observe-cost-")  # before metrics exist
    bare, observed = _apps()
    costs = []
    for _ in range(3):
        alone = asyncio.run(_cpu_per_request(bare, args.requests))
        wrapped = asyncio.run(_cpu_per_request(observed, args.requests))
        costs.append(wrapped - alone)
        print(f"bare app {alone:.1f} us/request, observed {wrapped:.1f} us/request: {wrapped - alone:.1f} us")
    print(f"median cost of observing a request: {statistics.median(costs):.1f} us of CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
