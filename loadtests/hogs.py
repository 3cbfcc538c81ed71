"""Run a command beside busy neighbours: CPU hogs of two kinds, one per core.

    python -m loadtests.hogs -- python -m pytest tests/test_loadtests.py
    python -m loadtests.hogs --kinds memory -- python -m pytest tests/test_loadtests.py -k overload

A test of behaviour must pass on a machine this busy; a test of speed need
not (that is what `make loadtest*` and `make bench` are for). `make test-busy`
runs the server and load tests this way. The hogs stop with the command.

The kinds press on different things:
  compute  a 384x384 numpy multiply on one thread, forever: it stays in the
           cache, so it takes cores and nothing else.
  memory   a loop that starts Python, imports torch and multiplies two 800x800
           matrices 3,000 times on one thread, then starts again: memory
           bandwidth and the start-up's page faults and file reads as well as
           compute -- what a neighbour training or launching jobs does. It
           broke a latency ratio in the overload test that `compute` hogs
           never did (issue 30).
By default each core gets one hog, the kinds taking turns (two cores: one of each).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys

KINDS = {
    "compute": "import numpy as np\na = np.random.rand(384, 384)\nwhile True:\n    a @ a\n",
    # The outer loop is Python too, so that the hog is one process group to stop (stop_hogs).
    "memory": ("import subprocess, sys\n"
               "ROUND = ('import torch\\ntorch.set_num_threads(1)\\n'\n"
               "         'a, b = torch.rand(800, 800), torch.rand(800, 800)\\n'\n"
               "         'for _ in range(3000):\\n    a @ b\\n')\n"
               "while True:\n    subprocess.run([sys.executable, '-c', ROUND])\n"),
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_hogs(count: int, kinds: tuple[str, ...] = ("compute",)) -> list[subprocess.Popen]:
    """`count` single-threaded CPU-bound processes, of `kinds` in turn; stop them with `stop_hogs`."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown hog kind(s) {sorted(unknown)}; have {sorted(KINDS)}")
    env = {**os.environ, **ONE_THREAD}
    return [subprocess.Popen([sys.executable, "-c", KINDS[kind]], env=env, start_new_session=True)
            for kind, _ in zip(itertools.cycle(kinds), range(count))]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    """SIGKILL each hog's process group (a memory hog's current round with it)."""
    for hog in hogs:
        try:
            os.killpg(hog.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        hog.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.hogs", description=__doc__.split("\n")[0])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="CPU-bound processes (default: cores)")
    parser.add_argument("--kinds", default="memory,compute",
                        help="comma-separated kinds, taken in turn (default: memory,compute)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        hogs = start_hogs(args.hogs, kinds)
    except ValueError as err:
        parser.error(str(err))
    print(f"{len(hogs)} CPU hog(s) running ({', '.join(kinds)} in turn): {[h.pid for h in hogs]}", flush=True)
    try:
        return subprocess.call(command)
    finally:
        stop_hogs(hogs)


if __name__ == "__main__":
    sys.exit(main())
