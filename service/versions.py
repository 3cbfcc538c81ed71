"""Moving a running service to another model version, without a restart and without failing a request.

`bentoml serve` runs several worker processes behind one port, so an HTTP call
reaches one of them. The move is therefore coordinated through a control
directory private to this server (created by its first worker, mode 0700,
named after the `bentoml serve` process every worker is a child of):

  order.json          what every worker should serve: {"generation", "tag", "previous"}
  worker-<pid>.json   what each worker serves, the last order it acted on, and how

1. The admin call (POST /admin/model, `python -m training serve-version`)
   lands on one worker, which first checks the new version itself (in the
   store, every hash of its manifest verified, compatible with the served
   one): a version that would be refused is refused before anyone moves.
2. It publishes the order. Every worker that holds the model (the API
   workers of the single layout; the model workers of the split layout,
   whose API workers follow with the model's shape) loads the new version
   beside the old one, verifies it, checks it, warms it up, then swaps in one
   step (one attribute assignment). A batch is run by whichever version was
   current when it started, and carries that version to the answer; the old
   version is freed when the last request using it finishes.
3. The caller waits until every live worker has reported on the order. If
   any refused, the previous version is ordered back, so the fleet never
   stays split, and the call says which worker refused and why.

A worker (re)started later reads the order and serves its version from the
start, so a restarted worker does not bring the old model back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from model import store
from model.atomic import atomic_write_bytes
from model.checkpoint import CheckpointError, Manifest, load_checkpoint

POLL_SECONDS = 0.2  # how often a worker looks for a new order: the swap's latency, for a stat() call


class IncompatibleModel(ValueError):
    """A version the running service cannot switch to (clients and decoders depend on what differs)."""


def check_compatible(served: Manifest, candidate: Manifest) -> None:
    """Refuse a version clients could tell apart by more than its answers: its preprocessing (clients
    and decoders size and normalize images for the served model) or its architecture (layer names
    and shapes, the number of classes: what feature-map, attribution and OIP clients ask for).
    A new version is the same network with other weights (and may rename its classes)."""
    if candidate.preprocessing != served.preprocessing:
        raise IncompatibleModel(f"its preprocessing {candidate.preprocessing.to_dict()} differs from the served "
                                f"model's {served.preprocessing.to_dict()}; serve it with a restart instead")
    if candidate.model_config != served.model_config:
        raise IncompatibleModel(f"its architecture ({candidate.preset}: {candidate.model_config.name}) differs from "
                                f"the served model's ({served.preset}: {served.model_config.name}); serve it with "
                                "a restart instead")


@dataclass
class WorkerStatus:
    pid: int
    role: str  # model (holds the weights) | api (split layout: follows with the model's shape)
    tag: str  # the version it serves
    generation: int  # the last order it acted on (0: the start-up model)
    state: str  # serving | refused
    error: str = ""
    seconds: float = 0.0  # how long its last move took

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ControlDir:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    PREFIX = "cnn-serving-control-"

    @classmethod
    def for_this_server(cls) -> ControlDir:
        """The directory shared by every worker of this `bentoml serve` (their common parent process);
        those of servers that have exited are removed on the way."""
        root = Path(tempfile.gettempdir())
        for stale in root.glob(f"{cls.PREFIX}*"):
            if stale.name.removeprefix(cls.PREFIX).isdigit() and not _alive(int(stale.name.removeprefix(cls.PREFIX))):
                shutil.rmtree(stale, ignore_errors=True)
        return cls(root / f"{cls.PREFIX}{os.getppid()}")

    def order(self) -> dict | None:
        try:
            return json.loads((self.path / "order.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def publish(self, tag: str, previous: str) -> int:
        """Order every worker to serve `tag`; returns the order's generation."""
        current = self.order()
        generation = (current["generation"] if current else 0) + 1
        atomic_write_bytes(self.path / "order.json",
                           json.dumps({"generation": generation, "tag": tag, "previous": previous}).encode())
        return generation

    def report(self, status: WorkerStatus) -> None:
        atomic_write_bytes(self.path / f"worker-{status.pid}.json", json.dumps(status.to_dict()).encode())

    def statuses(self) -> list[WorkerStatus]:
        """The live workers' reports (a killed worker's file is ignored, and removed)."""
        found = []
        for file in sorted(self.path.glob("worker-*.json")):
            try:
                status = WorkerStatus(**json.loads(file.read_text()))
            except (FileNotFoundError, ValueError, TypeError):
                continue
            if _alive(status.pid):
                found.append(status)
            else:
                file.unlink(missing_ok=True)
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VersionFollower:
    """A worker's side: watch the order, and move when it changes.

    `load(tag)` builds the new version beside the old one (verifying, checking, warming; raising
    on any problem); `install(version)` swaps it in, in one step."""

    def __init__(self, control: ControlDir, role: str, tag: str, load: Callable[[str], Any],
                 install: Callable[[Any], None]):
        self.control, self.role, self.tag = control, role, tag
        self.load, self.install = load, install
        self.generation = 0
        self.pid = os.getpid()  # whose report this is
        self._lock = threading.Lock()
        self.on_result: Callable[[str, float], None] = lambda result, seconds: None

    def start(self) -> None:
        """Act on an order already there (a worker restarted after a move), then follow in a thread."""
        self.step()
        if self.generation == 0:
            self.control.report(self._status("serving"))
        threading.Thread(target=self._follow, name="model-version-follower", daemon=True).start()

    def _follow(self) -> None:
        # The lowest CPU priority for this thread, and the threads it starts (torch's intra-op threads
        # of the new version's warm-up inherit it): a move must not take the cores from the requests
        # being served meanwhile, or admission control would refuse some of them (seen in bf16 at 16
        # users without it: a few 503s per move).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux: the move just competes for the cores
            pass
        while True:
            time.sleep(POLL_SECONDS)
            try:
                self.step()
            except Exception:  # never let the follower die: the next order must still be heard
                pass

    def step(self) -> None:
        with self._lock:
            order = self.control.order()
            if order is None or order["generation"] == self.generation:
                return
            started = time.perf_counter()
            state, error = "serving", ""
            if order["tag"] != self.tag:
                try:
                    self.install(self.load(order["tag"]))
                    self.tag = order["tag"]
                except Exception as err:  # the old version keeps serving
                    state, error = "refused", f"{type(err).__name__}: {err}"
                self.on_result("ok" if state == "serving" else "refused", time.perf_counter() - started)
            self.generation = order["generation"]
            self.control.report(self._status(state, error, time.perf_counter() - started))

    def _status(self, state: str, error: str = "", seconds: float = 0.0) -> WorkerStatus:
        return WorkerStatus(self.pid, self.role, self.tag, self.generation, state, error, round(seconds, 3))


def follow_versions(holder, role: str, tag: str) -> VersionFollower:
    """Follow this server's orders from now on: `holder.load(tag)` builds a version beside the served one,
    `holder.install(version)` swaps it in, `holder.metrics.observe_swap(result, seconds)` counts moves."""
    follower = VersionFollower(ControlDir.for_this_server(), role, tag, holder.load, holder.install)
    follower.on_result = holder.metrics.observe_swap
    follower.start()
    return follower


@dataclass
class MoveResult:
    moved: bool
    tag: str
    generation: int
    workers: list[WorkerStatus]
    reason: str = ""
    detail: str = ""

    def to_dict(self) -> dict:
        return {"moved": self.moved, "tag": self.tag, "generation": self.generation, "reason": self.reason,
                "detail": self.detail, "workers": [w.to_dict() for w in self.workers]}


def move_all(control: ControlDir, tag: str, previous: str, expected_workers: int, timeout_s: float) -> MoveResult:
    """Order `tag`, wait for every live worker's report; on any refusal order `previous` back."""
    generation = control.publish(tag, previous)
    reports = _wait_for(control, generation, expected_workers, timeout_s)
    refused = [w for w in reports if w.state != "serving" or w.tag != tag]
    if len(reports) >= expected_workers and not refused:
        return MoveResult(True, tag, generation, reports)
    missing = expected_workers - len(reports)
    detail = "; ".join(f"worker {w.pid} ({w.role}): {w.error or 'still on ' + w.tag}" for w in refused)
    if missing > 0:
        detail = f"{detail}; {missing} worker(s) did not answer within {timeout_s:.0f} s".lstrip("; ")
    back = control.publish(previous, previous)  # no worker stays on the new version alone
    _wait_for(control, back, expected_workers, timeout_s)
    return MoveResult(False, tag, generation, reports, "move_refused", f"{detail}; every worker is back on {previous}")


def _wait_for(control: ControlDir, generation: int, expected: int, timeout_s: float) -> list[WorkerStatus]:
    deadline = time.monotonic() + timeout_s
    while True:
        reports = [w for w in control.statuses() if w.generation >= generation]
        if len(reports) >= expected or time.monotonic() > deadline:
            return reports
        time.sleep(POLL_SECONDS / 2)


def check_candidate(tag: str, served: Manifest) -> str:
    """The full tag of a version the service could move to; raises Refusal-shaped errors
    (MoveRefused) for one it could not: missing, tampered or incomplete, incompatible."""
    from bentoml.exceptions import NotFound

    try:
        path, full_tag = store.resolve(tag)
    except (NotFound, ValueError) as err:
        raise MoveRefused(404, "unknown_version", f"{tag!r} is not in the model store: {err}") from None
    try:
        check_compatible(served, load_checkpoint(path).manifest)  # every hash verified on the way
    except CheckpointError as err:
        raise MoveRefused(422, "checkpoint_invalid", str(err)) from None
    except IncompatibleModel as err:
        raise MoveRefused(422, "incompatible_model", f"{full_tag}: {err}") from None
    return full_tag


class MoveRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
