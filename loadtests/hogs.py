"""Run a command beside CPU hogs: one single-threaded matrix multiply per core.

    python -m loadtests.hogs -- python -m pytest tests/test_loadtests.py

A test of behaviour must pass on a machine this busy; a test of speed need
not (that is what `make loadtest*` and `make bench` are for). `make test-busy`
runs the server and load tests this way. The hogs stop with the command.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

HOG = "import numpy as np\na = np.random.rand(384, 384)\nwhile True:\n    a @ a\n"


def start_hogs(count: int) -> list[subprocess.Popen]:
    """`count` single-threaded CPU-bound processes; the caller kills them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", HOG], env=env) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.hogs", description=__doc__.split("\n")[0])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="CPU-bound processes (default: cores)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    hogs = start_hogs(args.hogs)
    print(f"{len(hogs)} CPU hog(s) running: {[h.pid for h in hogs]}", flush=True)
    try:
        return subprocess.call(command)
    finally:
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
            hog.wait()


if __name__ == "__main__":
    sys.exit(main())
