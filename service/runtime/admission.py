"""Admission control: take what the service can answer within the latency budget, refuse the rest
at the door, cheaply.

A request is charged its cost in *units* -- single-image forward passes, plus
its encoded bytes' decoding converted into forward-pass equivalents (a 3000x2000
JPEG costs more to decode than a 640x480 one; an occlusion map costs its 64
passes). A worker admits requests while the units in flight stay within its
*cap*; beyond it a request waits in line or is refused (503 + Retry-After).
A request also takes its share of the *lane* of the model it runs in, and a
lane holds no more than keeps it busy: the batcher's (/classify, /embed, the
Open Inference Protocol's infer) its images, a full batch and a quarter per
worker where the model shares the CPU's cores with the decoding, two full
batches where it runs on a GPU (ServiceConfig.batches_in_flight); the
attributions' (/explain, /gradcam, computed one at a time on the machine)
one request per worker (the other workers' are next).

The cap is set by what admitted requests really take, not by a model of the
service: in each half second, the 90th percentile of the time from admission
to answer (body parsing, decoding, batching, the forward pass, the response,
and whatever else shares the cores), per endpoint, and the slowest endpoint's
is compared with the budget. Over it, the cap shrinks in proportion; well
under it while requests were kept waiting, the cap grows (up to 1.5x a round).
Only requests admitted under the current cap judge it (one slow burst does
not shrink it twice), and only those that queued behind others may shrink it
(a request alone takes what it takes, whatever the cap). This replaces an
estimate built from the forward pass's speed alone, which both over-admitted
where decoding dominates (accepted requests waited twice the budget) and,
once it refused, sank with every slow batch: under a retry storm of batch
requests the service collapsed to a third of its capacity.

The cap alone, held to a latency target, admits whatever answers in time. Where
the model is fast enough that a retry storm never fills the budget (bf16 on a
CPU with AMX at a 3 s budget: the cap at 29% load), that was every request
the clients sent -- 360 units in flight over two workers where 150 kept the
batches as full -- and the extra concurrency cost the storm 10% more CPU per
image than polite clients' (more decodes at once, more connections served,
the same batches of 32). The lanes' bounds stop there: on a CPU, images
decoding beside the forward take the cores it needs, and images beyond the
next batch only wait in memory, decoded; at the door, body unread, they cost
nothing (BENCHMARKS.md, goodput: "The model's lanes"). Likewise more
occlusion maps would only queue for their turn -- and their answers'
lateness would shrink the cap that the batches share. Work in no lane
(/feature_maps: one quick forward) is held to the cap only. A request held
back by its lane holds back only the requests of its lane behind it.

The rest of the design keeps refusals cheap, so that clients retrying at once
(a retry storm) cannot eat the capacity:
1. The door (service.http.guards.AdmitWhenRoom) decides before the body is read,
   from the request line and Content-Length: units per body byte are learned
   per endpoint from the requests it parsed. Once the request is parsed, its
   exact cost replaces the estimate (`settle`). A refused body is never parsed.
2. A request that does not fit waits at the door, body unread (TCP holds it
   back), up to `wait_seconds`, in arrival order, for room to free up; only
   then is it refused. An impolite client that retries the moment it is
   refused therefore costs one cheap refusal per wait, not thousands a second,
   and room that frees up is filled at once by a request already waiting.

Every method runs on the worker's event loop (the guard, the endpoints and the
batcher all do), so there are no locks.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from dataclasses import dataclass

from service.runtime.body_rate import BodyRate


@dataclass
class Ticket:
    """One admitted request's charge: at the door, an estimate from its body's size; once the request
    is parsed, its exact cost (`Admission.settle`)."""
    units: float
    label: str = ""
    body_bytes: int = 0
    admitted_at: float = 0.0
    queued: bool = False  # admitted while others were in flight
    lane: str = ""  # the lane of the model it runs in (service.core.endpoints), if any
    share: float = 0.0  # what it takes of the lane: images (the batcher's), requests (the attributions')


# The ticket of the request being handled: set by the door (service.http.guards), settled by the endpoint.
TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("admission_ticket", default=None)


class Admission:
    WINDOW_S = 0.5  # seconds per judgement of the cap, at the least
    ANSWERS = 8  # answers per judgement (one slow answer is not a trend), or 4 windows' worth
    QUANTILE = 0.9  # of the time from admission to answer, held to the budget
    MAX_GROWTH = 1.5  # per judgement, when requests are answered far within the budget
    MAX_SHRINK = 0.7

    def __init__(self, budget_seconds: float, initial_rate: float, wait_seconds: float = 0.0,
                 decode_seconds_per_byte: float = 0.0, lanes: dict[str, float] | None = None, clock=time.monotonic):
        self.budget_seconds = budget_seconds
        self.cap = max(1.0, initial_rate * budget_seconds)  # units in flight; judged from here on
        self.lanes = dict(lanes or {})  # lane -> the most of its shares in flight (service.service)
        self.in_lane = {lane: 0.0 for lane in self.lanes}  # shares in flight
        self.wait_seconds = wait_seconds
        self.decode_seconds_per_byte = decode_seconds_per_byte  # measured at start-up (service.runtime.decoding)
        self.forward_seconds_per_pass = 1 / max(initial_rate, 1e-3)
        self._forward_batches = 0
        self.work_factors: dict[str, float] = {}  # per kind of unbatched work: real cost per nominal pass
        self.inflight = 0.0
        self.requests = 0  # admitted and not yet answered
        self.recent_seconds = 0.0  # the last judged quantile of admission-to-answer
        self._clock = clock
        self._waiters: collections.deque[tuple[float, str, float, asyncio.Future]] = collections.deque()
        self._units_per_body = BodyRate()
        self._shares_per_body = BodyRate()
        self._judged_since = clock()  # requests admitted before this were admitted under an older cap
        self._answer_seconds: dict[str, list[float]] = {}  # per endpoint
        self._queued_answers = 0  # how many of them were admitted behind others
        self._pressed = False  # a request waited or was refused since the last judgement

    # ----- what a request costs -----------------------------------------------------------------

    def units(self, forward_passes: float, encoded_bytes: int = 0, kind: str = "") -> float:
        """Forward passes (of `kind` of work: what they were measured to cost), plus the decoding of
        `encoded_bytes`, in batched single-image forward-pass equivalents."""
        return (forward_passes * self.work_factors.get(kind, 1.0)
                + encoded_bytes * self.decode_seconds_per_byte / self.forward_seconds_per_pass)

    def observe_work(self, kind: str, forward_passes: float, seconds: float) -> None:
        """Unbatched model work ran (an attribution: fp32 passes on the reference copy, backward passes):
        learn what its nominal passes really cost against a batched forward pass, so that it is charged
        what it takes. (Charged nominally, eight occlusion maps filled the cap at a fraction of their
        real cost and held the model for seconds: BENCHMARKS.md, goodput.)"""
        if forward_passes > 0 and seconds > 0:
            factor = max(1.0, seconds / (forward_passes * self.forward_seconds_per_pass))
            learned = self.work_factors.get(kind)
            self.work_factors[kind] = factor if learned is None else 0.7 * learned + 0.3 * factor

    def observe_forward(self, images: int, seconds: float) -> None:
        """A batch ran. The first batches fix what one image's share of a batch costs (their fastest),
        the exchange rate between decoding and forward passes; fixed, so a unit stays a unit."""
        if images and seconds > 0 and self._forward_batches < 20:
            self._forward_batches += 1
            self.forward_seconds_per_pass = min(seconds / images, self.forward_seconds_per_pass)

    def door_estimate(self, label: str, body_bytes: int | None) -> float:
        """A request's units from its endpoint and Content-Length alone (before its body is read)."""
        return self._units_per_body.estimate(label, body_bytes)

    def door_share(self, label: str, body_bytes: int | None) -> float:
        """A request's share of its lane (a batched request's images) from its endpoint and
        Content-Length alone."""
        return self._shares_per_body.estimate(label, body_bytes)

    # ----- admitting -----------------------------------------------------------------------------

    def _holds_back(self, units: float, lane: str = "", share: float = 0.0) -> str:
        """What keeps a request out: "cap", "lane" (its lane's bound), or "" (it fits). An idle worker
        takes any request, however large, and a lane holds a request back only while others are in
        it, so nothing is refused forever."""
        if self.requests == 0:
            return ""
        if self.inflight + units > self.cap:
            return "cap"
        taken = self.in_lane.get(lane, 0.0)
        if share and taken and taken + share > self.lanes.get(lane, float("inf")):
            return "lane"
        return ""

    def fits(self, units: float, lane: str = "", share: float = 0.0) -> bool:
        return not self._holds_back(units, lane, share)

    def try_admit(self, units: float, lane: str = "", share: float = 0.0) -> bool:
        """Admit now if it fits and nobody is waiting ahead of it who would be admitted first."""
        if self._ahead_of(lane) or not self.fits(units, lane, share):
            return False
        self._take(units, lane, share)
        return True

    async def enter(self, units: float, label: str = "", body_bytes: int = 0, lane: str = "",
                    share: float = 0.0) -> Ticket | None:
        """A ticket for `units` (and `share` of `lane`), at once or after waiting in line up to
        wait_seconds; None: refused."""
        ticket = Ticket(units, label, body_bytes or 0, queued=self.requests > 0, lane=lane, share=share)
        if not self.try_admit(units, lane, share):
            if self._holds_back(units, lane, share) == "cap":
                self._pressed = True  # the cap, not a lane: only the cap's pressure may grow it
            if not await self._wait_in_line(units, lane, share):
                return None
            ticket.queued = True
        ticket.admitted_at = self._clock()
        return ticket

    async def _wait_in_line(self, units: float, lane: str, share: float) -> bool:
        if self.wait_seconds <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        entry = (units, lane, share, waiter)
        self._waiters.append(entry)
        admitted = False
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.wait_seconds)
            admitted = waiter in done
        finally:
            if not admitted:  # the wait ran out, or the client went away while waiting
                if waiter.done() and not waiter.cancelled():  # room came just as it was cancelled
                    self._give_back(units, lane, share)
                    self.requests -= 1
                waiter.cancel()
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
        return admitted

    def settle(self, ticket: Ticket, units: float, share: float | None = None) -> bool:
        """Charge a parsed request its exact cost (and share of its lane) instead of the door's
        estimate. False: it turned out far larger than estimated and does not fit the cap (the caller
        refuses it; the door releases the ticket)."""
        if ticket.body_bytes:
            self._units_per_body.learn(ticket.label, units, ticket.body_bytes)
            if share:
                self._shares_per_body.learn(ticket.label, share, ticket.body_bytes)
        extra = units - ticket.units
        alone = self.requests <= 1  # nothing else in flight: it is served, however large
        if extra > ticket.units and not alone and self.inflight + extra > self.cap:
            return False
        self.inflight += extra
        ticket.units = units
        shrunk = extra < 0
        if share is not None and ticket.lane in self.in_lane:
            self.in_lane[ticket.lane] += share - ticket.share
            shrunk = shrunk or share < ticket.share
            ticket.share = share
        if shrunk:  # smaller than estimated: room for the line (grown, it can make none)
            self._wake()
        return True

    def release(self, ticket: Ticket, served: bool) -> None:
        """The request is answered: its units leave; a served one's time from admission to answer
        judges the cap."""
        self.requests -= 1
        if self.requests:
            self._give_back(ticket.units, ticket.lane, ticket.share)
        else:
            self.inflight = 0.0
            self.in_lane = dict.fromkeys(self.in_lane, 0.0)
        ticket.units = ticket.share = 0.0
        now = self._clock()
        if served and ticket.admitted_at >= self._judged_since:
            self._answer_seconds.setdefault(ticket.label, []).append(now - ticket.admitted_at)
            self._queued_answers += ticket.queued
        elapsed, answers = now - self._judged_since, sum(map(len, self._answer_seconds.values()))
        if (elapsed >= self.WINDOW_S and answers >= self.ANSWERS) or (elapsed >= 4 * self.WINDOW_S and answers):
            self._judge(now)
        self._wake()

    def load(self) -> float:
        """Admitted work over what the worker admits (the cap, or a lane's bound, whichever is nearest
        full): 1.0 is full (new requests wait or are refused). The one number that says how busy an
        instance is whatever its speed: the autoscaler's metric (deploy/kubernetes)."""
        return max([self.inflight / self.cap] + [self.in_lane[lane] / bound for lane, bound in self.lanes.items()])

    def full(self) -> bool:
        return not self.fits(1.0)

    def waiting(self) -> int:
        return sum(1 for *_, waiter in self._waiters if not waiter.done())

    def door_rates(self) -> dict[str, float]:
        """What the door has learned to charge per MB of body, per endpoint."""
        return self._units_per_body.per_mb()

    def door_shares(self) -> dict[str, float]:
        """What the door has learned to expect of a lane per MB of body (a batched request's images), per
        endpoint."""
        return self._shares_per_body.per_mb()

    # ----- judging the cap --------------------------------------------------------------------------

    def _judge(self, now: float) -> None:
        # Each endpoint's quantile, and the slowest of them: a few slow /explain answers among many
        # quick /classify ones must be held to the budget too, not hidden in a common percentile.
        self.recent_seconds = max(_quantile(times, self.QUANTILE) for times in self._answer_seconds.values())
        ratio = self.budget_seconds / max(self.recent_seconds, 1e-6)
        # Only requests that queued behind others may shrink it: one alone takes what it takes, whatever
        # the cap. (They may grow it: a cap shrunk to one request at a time must be able to come back.)
        if ratio < 1 and self._queued_answers:  # answered too late: admit less, in proportion
            self.cap = max(1.0, self.cap * max(self.MAX_SHRINK, ratio))
        elif ratio > 1 and self._pressed:  # within the budget while requests were kept out: admit more
            self.cap *= min(self.MAX_GROWTH, ratio)
        self._answer_seconds = {}
        self._queued_answers = 0
        self._pressed = False
        self._judged_since = now

    def _wake(self) -> None:
        """Admit waiting requests in arrival order. The first one the cap holds back stops the line;
        one its lane holds back stops only its lane's requests behind it (an occlusion map behind a
        batch of photos needs no room in the batches, only under the cap)."""
        held_lanes = set()
        for entry in list(self._waiters):
            units, lane, share, waiter = entry
            if waiter.done():
                self._waiters.remove(entry)
                continue
            if lane in held_lanes:
                continue
            held = self._holds_back(units, lane, share)
            if held == "cap":
                self._pressed = True  # kept out by the cap (while its lane had room): the cap may grow
                return
            if held == "lane":
                held_lanes.add(lane)
                continue
            self._waiters.remove(entry)
            self._take(units, lane, share)
            waiter.set_result(True)

    def _ahead_of(self, lane: str) -> bool:
        """Is someone in line who goes first: one the cap holds back, or one of the same lane?"""
        return any(not waiter.done() and ((lane and lane == their_lane) or self._holds_back(units) == "cap")
                   for units, their_lane, _, waiter in self._waiters)

    def _take(self, units: float, lane: str, share: float) -> None:
        self.inflight += units
        if lane in self.in_lane:
            self.in_lane[lane] += share
        self.requests += 1

    def _give_back(self, units: float, lane: str, share: float) -> None:
        self.inflight = max(0.0, self.inflight - units)
        if lane in self.in_lane:
            self.in_lane[lane] = max(0.0, self.in_lane[lane] - share)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
