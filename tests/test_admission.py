"""Admission control (service.admission): its arithmetic, its rate, and its line at the door, on a
fake clock. The door in front of a real service is tested in tests/test_goodput.py."""

import asyncio

import pytest

from service.admission import Admission


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_admits_while_the_work_in_flight_fits_the_cap_then_refuses():
    admission = Admission(budget_seconds=0.5, initial_rate=20.0)  # 20 units/s: a cap of 10 units
    assert all(admission.try_admit(1) for _ in range(10))
    assert not admission.try_admit(1)
    assert admission.full() and admission.load() == 1.0


def test_an_idle_service_takes_any_request_however_large():
    admission = Admission(budget_seconds=0.1, initial_rate=10.0)
    ticket = asyncio.run(admission.enter(64))
    assert ticket is not None  # nothing in flight: refusing it would refuse it forever
    assert not admission.try_admit(1)
    admission.release(ticket, served=True)
    assert admission.inflight == 0 and admission.requests == 0


def test_a_request_costs_its_passes_and_its_bytes_decoding():
    admission = Admission(budget_seconds=1.0, initial_rate=100.0, decode_seconds_per_byte=1e-8)
    admission.observe_forward(10, 0.05)  # 5 ms a pass
    assert admission.units(8) == 8
    assert admission.units(1, 1_000_000) == pytest.approx(1 + 0.01 / 0.005)  # 10 ms of decoding = 2 passes
    assert admission.units(64) > admission.units(1, 100_000)  # an occlusion map outweighs one photo


def test_the_door_learns_units_per_byte_and_settles_to_the_exact_cost():
    admission = Admission(budget_seconds=1.0, initial_rate=100.0)
    assert admission.door_estimate("classify", 400_000) == 1.0  # nothing learned yet
    ticket = asyncio.run(admission.enter(1.0, "classify", 400_000))
    assert admission.settle(ticket, 8.0) and admission.inflight == 8.0
    assert admission.door_estimate("classify", 400_000) == pytest.approx(8.0)
    assert admission.door_estimate("classify", 50_000) == pytest.approx(1.0)
    admission.release(ticket, served=True)
    assert admission.inflight == 0


def test_settling_refuses_a_request_far_larger_than_its_estimate_when_it_does_not_fit():
    admission = Admission(budget_seconds=1.0, initial_rate=10.0)
    assert admission.try_admit(8)
    ticket = asyncio.run(admission.enter(1.0, "classify", 1000))
    assert ticket is not None  # 9 units: 0.9 s, fits
    assert not admission.settle(ticket, 64.0)  # 64 tiny images in a small body: 7.1 s, refused
    admission.release(ticket, served=False)
    assert admission.inflight == 8
    alone = Admission(budget_seconds=1.0, initial_rate=10.0)
    ticket = asyncio.run(alone.enter(1.0, "classify", 1000))
    assert alone.settle(ticket, 64.0)  # alone in flight: served however large, as at the door


def _round(admission: Admission, clock: Clock, requests: int, seconds: float, pressed: bool = True) -> None:
    """`requests` requests of one unit admitted together and answered after `seconds`; `pressed`:
    one more was kept out meanwhile."""
    tickets = [asyncio.run(admission.enter(1)) for _ in range(requests)]
    if pressed:
        assert asyncio.run(admission.enter(admission.cap + 1)) is None  # does not fit: refused (no wait)
    clock.now += max(seconds, Admission.WINDOW_S)
    for ticket in reversed(tickets):  # the first, admitted alone, answered last
        admission.release(ticket, served=True)


def test_the_cap_shrinks_when_answers_miss_the_budget_and_grows_back_when_they_are_early():
    clock = Clock()
    admission = Admission(budget_seconds=1.0, initial_rate=100.0, clock=clock)  # cap 100 units
    _round(admission, clock, 50, 1.2)  # answers took 1.2 x the budget (a CPU hog)
    assert admission.cap == pytest.approx(100 / 1.2) and admission.recent_seconds == 1.2
    _round(admission, clock, 40, 4.0)  # far over: shrinks by 30% at most in one judgement
    assert admission.cap == pytest.approx(100 / 1.2 * 0.7)
    _round(admission, clock, 20, 0.8)  # the hog is gone: answers early, requests kept out
    assert admission.cap == pytest.approx(100 / 1.2 * 0.7 * 1.25)
    _round(admission, clock, 20, 0.25)  # far within the budget: grows by half at most
    assert admission.cap == pytest.approx(100 / 1.2 * 0.7 * 1.25 * 1.5)


def test_a_cap_shrunk_to_one_request_at_a_time_comes_back():
    clock = Clock()
    admission = Admission(budget_seconds=1.0, initial_rate=1.0, clock=clock)  # cap 1 unit: one at a time
    for _ in range(16):  # each answered in 0.2 s, alone, while others were kept out
        ticket = asyncio.run(admission.enter(1))
        assert asyncio.run(admission.enter(1)) is None
        clock.now += 0.2
        admission.release(ticket, served=True)
    assert admission.cap == pytest.approx(1.5 ** 2)  # two judgements of 8 answers: 1.5x each


def test_the_cap_grows_only_when_requests_were_kept_out():
    clock = Clock()
    admission = Admission(budget_seconds=1.0, initial_rate=100.0, clock=clock)
    for _ in range(4):  # a light load answered quickly says nothing about a larger one
        _round(admission, clock, 5, 0.1, pressed=False)
    assert admission.cap == 100.0


def test_requests_admitted_under_an_older_cap_do_not_judge_the_new_one():
    clock = Clock()
    admission = Admission(budget_seconds=1.0, initial_rate=100.0, clock=clock)
    early = [asyncio.run(admission.enter(1)) for _ in range(10)]
    _round(admission, clock, 10, 2.0)  # judged: shrunk
    assert admission.cap == pytest.approx(70.0)
    clock.now += 1.0
    for ticket in early:  # admitted before that judgement, answered late: they judged it already
        admission.release(ticket, served=True)
    assert admission.cap == pytest.approx(70.0)


def test_a_request_waits_in_line_for_room_and_is_refused_when_none_comes():
    async def scenario():
        admission = Admission(budget_seconds=1.0, initial_rate=10.0, wait_seconds=0.2)
        first = await admission.enter(10)
        waiting = asyncio.create_task(admission.enter(5))
        later = asyncio.create_task(admission.enter(1))  # fits alone, but waits its turn behind `waiting`
        await asyncio.sleep(0.05)
        assert admission.waiting() == 2 and not waiting.done() and not later.done()
        admission.release(first, served=True)  # room: the line is admitted in arrival order
        assert (await waiting) is not None and (await later) is not None
        assert admission.inflight == 6 and admission.requests == 2
        assert await admission.enter(10) is None  # no room comes within 0.2 s: refused
        assert admission.waiting() == 0 and admission.inflight == 6

    asyncio.run(scenario())


def test_a_client_that_leaves_the_line_takes_nothing_with_it():
    async def scenario():
        admission = Admission(budget_seconds=1.0, initial_rate=10.0, wait_seconds=5.0)
        first = await admission.enter(10)
        waiting = asyncio.create_task(admission.enter(5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        admission.release(first, served=True)
        assert admission.inflight == 0 and admission.requests == 0 and admission.waiting() == 0

    asyncio.run(scenario())
