"""A worker's memory policy (service.core.heap): few malloc arenas, however many threads allocate."""

from __future__ import annotations

import os
import subprocess
import sys

from testkit.server import ROOT

# Eight threads allocate at once and stay alive; glibc's malloc_info then lists the heaps (arenas) made.
ARENAS_SCRIPT = """
import ctypes, sys, tempfile, threading
limit = int(sys.argv[1])
if limit:
    from service.core.heap import limit_malloc_arenas
    assert limit_malloc_arenas(limit) == limit
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
allocated, done = threading.Barrier(9), threading.Event()
def work():
    blocks = [libc.malloc(4096) for _ in range(64)]  # from this thread's arena
    allocated.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
allocated.wait()
with tempfile.NamedTemporaryFile("r") as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(out.read().count("<heap nr="))
done.set()
"""


def _heaps(limit: int, **env: str) -> int:
    done = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, str(limit)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env}, check=True)
    return int(done.stdout.strip())


def test_threads_share_a_few_malloc_arenas():
    """Left alone, glibc gives eight allocating threads an arena each (up to 8 per core), each keeping its
    own high-water mark; limited, they share two."""
    env = {"MALLOC_ARENA_MAX": ""}  # not the operator's setting: ours
    assert _heaps(0, **env) >= 8
    assert _heaps(2, **env) <= 2


def test_an_operators_malloc_arena_max_is_left_alone():
    done = subprocess.run([sys.executable, "-c", "from service.core.heap import limit_malloc_arenas as f; print(f(2))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "MALLOC_ARENA_MAX": "4"})
    assert done.stdout.strip() == "None"
