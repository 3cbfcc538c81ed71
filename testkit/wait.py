"""Waiting for a condition in tests: poll it, with a hang guard, instead of sleeping a fixed time that a
slow or busy machine can outrun."""

from __future__ import annotations

import time


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.05):
    """Poll `condition()` until it returns something true (returned), or fail naming `what` after
    `timeout_s` (a hang guard, not a speed gate)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(every_s)
