"""A worker's memory: the garbage collector's frozen heap, and glibc's arenas.

Three habits keep a serving process's memory flat over hours and model moves:
  1. Start-up freezes its heap out of the cyclic garbage collector
     (`freeze_startup_heap`), and a model move freezes it again once the old
     version is gone (`settle_heap`).
  2. Freed memory goes back to the system after a move (`malloc_trim`).
  3. Few malloc arenas (`limit_malloc_arenas`): glibc gives threads up to
     eight arenas per core, and each keeps the high-water mark of whatever
     ran in it. A worker runs dozens of threads (decoding, the forward, the
     attributions, the version follower), each request kind with buffers of
     its own size: under the smoke mix (16 users, AlexNet, two workers, no
     model move) the workers' resident memory grew 3.99 -> 5.34 GB in four
     minutes; with one arena per core it levelled off at 3.98 GB within a
     minute (issue 30; BENCHMARKS.md, "Memory").
"""

from __future__ import annotations

import ctypes
import gc
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def limit_malloc_arenas(arenas: int | None = None) -> int | None:
    """At most `arenas` malloc arenas in this process (default: one per core); returns the limit set,
    or None where it is not set: not glibc, or MALLOC_ARENA_MAX set by the operator (glibc read it at
    start). Arenas already made stay; so call it before the worker starts its threads."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return None
    libc = _libc()
    limit = arenas or os.cpu_count() or 1
    if libc is None or not libc.mallopt(M_ARENA_MAX, limit):
        return None
    return limit


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): free memory of every arena back to the system (ctypes releases the GIL
    for the call). False where there is no glibc, or nothing was returned."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def freeze_startup_heap() -> None:
    """Exempt everything built at start-up from Python's cyclic garbage collector.

    The imports, the model and BentoML's app are ~470,000 long-lived objects. A
    full (generation 2) collection walks them all while holding the GIL: here it
    took 220 ms, during which the event loop answered nobody and the forward
    thread stopped -- the slowest accepted requests under load were exactly
    those. Frozen objects are never walked again (they live as long as the
    process anyway), so later collections only see the objects requests create.
    """
    gc.collect()
    gc.freeze()


def settle_heap(released: bool) -> str:
    """Exempt the new version's long-lived objects from the cyclic garbage collector, as start-up does
    for its own (`freeze_startup_heap`), in a process that froze its heap; then hand the old
    version's freed memory back to the system.

    A version's objects are freed by reference counting when its last request finishes, frozen or
    not (it holds no reference cycle: measured, every tensor of a Predictor goes with its last
    reference), so when the old version is gone (`released`) a collection of the unfrozen objects
    (the new version's, and what requests left since the last freeze) then gc.freeze() suffices: a
    few ms. If it is still alive after the wait -- held by a cycle, which frozen would never be
    collected, or by a request that outlived the wait -- gc.unfreeze() first, so that the full
    collection can free it: the whole heap walked once, ~0.3-0.4 s holding the GIL (measured).

    Freed is not returned: glibc keeps the old weights' smaller tensors in its per-thread arenas
    (the follower thread's, which loaded them), and a worker's RSS crept up by about one AlexNet
    per few moves until malloc_trim(0) gave it back (measured: BENCHMARKS.md)."""
    if gc.get_freeze_count() == 0:
        how = "heap not frozen in this process"
    elif released:
        gc.collect()
        gc.freeze()
        how = "old version freed; young objects collected and frozen"
    else:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        how = "old version still alive: heap unfrozen, fully collected, frozen again"
    return how + ("; free memory returned" if malloc_trim() else "")
