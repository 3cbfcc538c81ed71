"""The in-process batcher: concurrent requests share forward passes, in order, whole, on time."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.runtime.batching import BatchPolicy, Batcher
from service.core.refusals import Refusal


def images(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 2, 2, 3), value, dtype=np.uint8)


class SlowModel:
    """Records each batch; each forward takes `seconds` (off the event loop, like the real one)."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[int]] = []

    async def forward(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch[:, 0, 0, 0].tolist())
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in batch[:, 0, 0, 0]:
            raise RuntimeError("boom")
        return batch[:, 0, 0, 0] * 10


def split(result: np.ndarray, start: int, stop: int) -> list[int]:
    return result[start:stop].tolist()


def test_a_lone_request_runs_at_once_and_gets_its_rows():
    async def main():
        model = SlowModel()
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=5))
        assert await batcher.submit(images(2, 3)) == [30, 30]
        assert model.batches == [[3, 3]]

    asyncio.run(main())


def test_requests_that_arrive_during_a_forward_share_the_next_one():
    async def main():
        model = SlowModel()
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=5))
        first = asyncio.ensure_future(batcher.submit(images(1, 1)))
        await asyncio.sleep(0.01)  # the first forward is running now
        waiting = [asyncio.ensure_future(batcher.submit(images(1, v))) for v in (2, 3, 4)]
        results = await asyncio.gather(first, *waiting)
        assert results == [[10], [20], [30], [40]]
        assert model.batches == [[1], [2, 3, 4]]  # arrival order, one forward for the three

    asyncio.run(main())


def test_batches_respect_the_size_limit_and_never_split_a_request():
    async def main():
        model = SlowModel()
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=4, max_latency_s=5))
        first = asyncio.ensure_future(batcher.submit(images(1, 1)))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(images(n, v))) for n, v in ((3, 2), (2, 3), (5, 4))]
        await asyncio.gather(first, *rest)
        assert model.batches == [[1], [2, 2, 2], [3, 3], [4, 4, 4, 4, 4]]  # 3+2 > 4; a 5-image request alone

    asyncio.run(main())


def test_a_request_that_waited_past_the_budget_is_refused_not_run_late():
    async def main():
        model = SlowModel(seconds=0.3)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=0.1))
        first = asyncio.ensure_future(batcher.submit(images(1, 1)))
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batcher.submit(images(1, 2)))
        assert await first == [10]
        with pytest.raises(Refusal) as refused:
            await late
        assert refused.value.status == 503 and refused.value.reason == "overloaded"
        assert model.batches == [[1]]

    asyncio.run(main())


def test_a_failed_forward_fails_its_own_requests_and_the_batcher_goes_on():
    async def main():
        model = SlowModel(fail_on=9)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=5))
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(images(1, 9))
        assert await batcher.submit(images(1, 5)) == [50]

    asyncio.run(main())


def test_a_cancelled_request_is_left_out_of_its_batch():
    async def main():
        model = SlowModel()
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=5))
        first = asyncio.ensure_future(batcher.submit(images(1, 1)))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(images(1, 2)))
        kept = asyncio.ensure_future(batcher.submit(images(1, 3)))
        await asyncio.sleep(0.001)
        gone.cancel()  # the client disconnected
        assert await kept == [30] and await first == [10]
        assert model.batches == [[1], [3]]

    asyncio.run(main())


# ----- a deep queue's batch waits for images on their way (service.runtime.batching's "target") ---------

HANG_GUARD_S = 20  # far above any wait these tests expect: only a batcher that waits for nothing trips it


def test_a_batch_waits_for_images_announced_as_on_their_way():
    async def main():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=60, gather_s=30))

        async def request(value: int, decode_s: float):
            with batcher.expecting(1):  # admitted, decoding
                await asyncio.sleep(decode_s)
            return await batcher.submit(images(1, value))

        answers = await asyncio.wait_for(asyncio.gather(*(request(v, 0.02 * v) for v in (1, 2, 3))), HANG_GUARD_S)
        assert answers == [[10], [20], [30]]
        assert model.batches == [[1, 2, 3]]  # the first waited for the two still decoding

    asyncio.run(main())


def test_a_lone_request_never_waits_even_with_a_long_gather_limit():
    async def main():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=60, gather_s=3600))
        for value in (1, 2, 3):  # one client, one request at a time
            assert await asyncio.wait_for(batcher.submit(images(1, value)), HANG_GUARD_S) == [value * 10]
        assert model.batches == [[1], [2], [3]]

    asyncio.run(main())


def test_an_announcement_withdrawn_without_a_submit_ends_the_wait():
    async def main():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=60, gather_s=3600))

        async def refused_while_decoding():
            with pytest.raises(ValueError):
                with batcher.expecting(1):
                    await asyncio.sleep(0.05)
                    raise ValueError("not an image")

        refused = asyncio.ensure_future(refused_while_decoding())
        await asyncio.sleep(0)  # announced
        assert await asyncio.wait_for(batcher.submit(images(1, 7)), HANG_GUARD_S) == [70]
        await refused
        assert model.batches == [[7]]

    asyncio.run(main())


def test_clients_whose_answers_just_went_out_are_waited_for():
    """Closed-loop clients: eight requests were present at once a moment ago, so when the first of
    them comes back the batcher waits for the rest instead of running it alone."""
    async def main():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=60, gather_s=30))

        async def client(value: int):
            first = await batcher.submit(images(1, value))
            await asyncio.sleep(0.01 * value)  # the answer's way back and the next request's way in
            return first, await batcher.submit(images(1, value))

        await asyncio.wait_for(asyncio.gather(*(client(v) for v in range(8))), HANG_GUARD_S)
        assert model.batches == [list(range(8)), list(range(8))]

    asyncio.run(main())


def test_a_batch_waits_no_longer_than_the_gather_limit():
    async def main():
        model = SlowModel(seconds=0.01)
        batcher = Batcher(model.forward, split, BatchPolicy(max_batch_size=8, max_latency_s=60, gather_s=0.05))
        with batcher.expecting(5):  # announced, never submitted within the limit
            assert await asyncio.wait_for(batcher.submit(images(1, 4)), HANG_GUARD_S) == [40]
        assert model.batches == [[4]]

    asyncio.run(main())
