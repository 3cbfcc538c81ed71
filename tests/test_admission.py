"""Admission control: the arithmetic that refuses at the door what would miss the latency budget."""

from service.admission import Admission


def test_admits_while_the_queue_fits_the_budget_then_refuses():
    admission = Admission(budget_seconds=0.5, initial_rate=20.0)  # 20 img/s: 10 images fit in 0.5 s
    assert all(admission.try_admit(1) for _ in range(10))
    assert not admission.try_admit(1)
    assert admission.full()
    admission.release(1)
    assert not admission.full() and admission.try_admit(1)


def test_an_idle_service_takes_any_request_however_large():
    admission = Admission(budget_seconds=0.1, initial_rate=10.0)
    assert admission.try_admit(64)  # nothing in flight: refusing it would refuse it forever
    assert not admission.try_admit(1)
    admission.release(64)
    assert admission.inflight == 0


def test_rate_jumps_to_a_faster_measurement_and_decays_slowly_after_slow_ones():
    admission = Admission(budget_seconds=1.0, initial_rate=10.0)
    admission.observe(8, 0.1)  # 80 img/s
    assert admission.rate == 80.0
    admission.observe(8, 1.0)  # one slow batch barely moves the estimate
    assert admission.rate == 80.0 * Admission.DECAY
    for _ in range(60):  # a machine slowed for many batches is followed
        admission.observe(8, 1.0)
    assert 8.0 <= admission.rate < 10.0
