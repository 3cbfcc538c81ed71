"""Admission control (service.runtime.admission): its arithmetic, its rate, its line at the door and the
model's lanes, on a fake clock. The door in front of a real service is tested in tests/test_goodput.py."""

import asyncio
import threading
import time

import pytest

from service.runtime.admission import Admission
from service.core.settings import ServiceConfig
from service.control.control_dir import ControlDir


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


def test_a_lane_holds_its_requests_at_its_bound_while_other_work_goes_by():
    async def scenario():
        # A cap far from full (100 units), the batches' lane bound to 8 images, the attributions' to 2.
        admission = Admission(budget_seconds=1.0, initial_rate=100.0, wait_seconds=0.2,
                              lanes={"batch": 8, "attribution": 2})
        first = await admission.enter(4, "classify", lane="batch", share=4)
        second = await admission.enter(4, "classify", lane="batch", share=4)
        assert admission.in_lane["batch"] == 8 and admission.load() == 1.0
        held = asyncio.create_task(admission.enter(4, "classify", lane="batch", share=4))
        behind = asyncio.create_task(admission.enter(1, "classify", lane="batch", share=1))  # waits its turn
        await asyncio.sleep(0.01)
        assert admission.waiting() == 2
        # Other lanes, and work in none, need only the cap: they go by the batches' line.
        maps = [await admission.enter(17, "explain", lane="attribution", share=1) for _ in range(2)]
        feature_maps = await admission.enter(1, "feature_maps")
        assert None not in maps and feature_maps is not None and admission.waiting() == 2
        third_map = asyncio.create_task(admission.enter(17, "explain", lane="attribution", share=1))
        admission.release(first, served=True)  # four images' room: the batches' line in arrival order
        assert (await held) is not None and (await behind) is None  # 9 > 8: it waited its 0.2 s in vain
        assert (await third_map) is None  # two attributions in flight the whole time: refused too
        assert admission.in_lane == {"batch": 8, "attribution": 2}
        assert admission.inflight == 4 + 4 + 2 * 17 + 1
        assert not admission._pressed  # held back by lanes, not the cap: the cap has no cause to grow
        for ticket in (second, feature_maps, *maps):
            admission.release(ticket, served=True)

    asyncio.run(scenario())


def test_a_request_larger_than_its_lane_is_served_once_the_lane_is_empty():
    admission = Admission(budget_seconds=1.0, initial_rate=1000.0, lanes={"batch": 8})
    explain = asyncio.run(admission.enter(17))
    assert admission.try_admit(64, "batch", 64)  # only other work in flight: 64 images still go in
    assert not admission.try_admit(1, "batch", 1)
    admission.release(explain, served=True)


def test_small_bodies_do_not_make_the_door_expect_many_images_in_a_large_one():
    """Three 31-byte junk bodies of one image each between 11.6 KB bodies of one image: the door
    expects a couple of images in the next 11.6 KB body, not 147 (averaging each request's own
    images per byte, it did: the batches' lane let one such request in at a time, and a burst of
    24 waited out its line -- tests/test_service's burst, in CI)."""
    admission = Admission(budget_seconds=1.0, initial_rate=1000.0, lanes={"batch": 40})
    for body in (11_611, 31, 31, 31, 11_611):
        ticket = asyncio.run(admission.enter(1.0, "classify", body, lane="batch", share=1.0))
        assert admission.settle(ticket, 1.0, share=1)
        admission.release(ticket, served=body > 31)
    assert admission.door_share("classify", 11_611) < 3
    assert admission.door_estimate("classify", 11_611) < 3
    assert admission.door_share("classify", 31) == 1.0  # never less than one image


def test_the_door_learns_a_batched_requests_images_from_its_body():
    admission = Admission(budget_seconds=1.0, initial_rate=1000.0, lanes={"batch": 64})
    assert admission.door_share("classify", 800_000) == 1.0  # nothing learned yet
    ticket = asyncio.run(admission.enter(1.0, "classify", 800_000, lane="batch", share=1.0))
    assert admission.settle(ticket, 11.0, share=8) and admission.in_lane["batch"] == 8
    assert admission.door_share("classify", 800_000) == pytest.approx(8.0)
    assert admission.door_share("embed", 800_000) == 1.0  # per endpoint
    admission.release(ticket, served=True)
    assert admission.in_lane["batch"] == 0 and admission.inflight == 0


def test_the_batches_lane_holds_more_where_the_model_runs_beside_the_decoding_on_a_gpu():
    assert ServiceConfig().batches_in_flight(model_on_gpu=False) == 1.25
    assert ServiceConfig().batches_in_flight(model_on_gpu=True) == 2.0
    assert ServiceConfig(admission_batches=3).batches_in_flight(model_on_gpu=False) == 3.0


def test_attributions_take_turns_across_the_workers_of_a_machine(tmp_path):
    # Two workers' attribution threads (an flock per open file: threads of one process exclude each
    # other as processes do): their attributions never overlap.
    control = ControlDir(tmp_path)
    held = []

    def attribution(name):
        with control.taking_turns("attribution"):
            held.append((name, "in"))
            time.sleep(0.1)
            held.append((name, "out"))

    threads = [threading.Thread(target=attribution, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [step for _, step in held] == ["in", "out", "in", "out"]
    assert held[0][0] == held[1][0] and held[2][0] == held[3][0]
