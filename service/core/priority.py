"""Background work at the lowest CPU priority, so that the requests being served keep the cores."""

from __future__ import annotations

import os
import threading


def lower_this_thread() -> None:
    """Nice 19 for the calling thread, and for the threads it starts from now on (torch's intra-op
    threads of a forward pass it runs inherit it). A thread cannot raise its niceness again, so call
    it in a thread of its own, never in a pooled one. Not Linux: the work just competes for the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
