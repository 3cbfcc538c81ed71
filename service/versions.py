"""Moving a running service to another model version, without a restart and without failing a request.

`bentoml serve` runs several worker processes behind one port, so an HTTP call
reaches one of them. The move is therefore coordinated through a control
directory private to this server (created by its first worker, mode 0700,
named after the `bentoml serve` process every worker is a child of):

  order.json          what every worker should serve: {"generation", "tag", "previous"}
  worker-<pid>.json   what each worker serves, the last order it acted on, and how

(and, beside the moves, what else the workers share: `connections`, their
connection counts, service.connection_board; `attribution.lock`, whose turn
it is to compute an attribution, service.backend)

1. The admin call (POST /admin/model, `python -m training serve-version`)
   lands on one worker, which takes the moves' lock (`move.lock`, flock: one
   move at a time across every worker; a second call meanwhile is answered
   409 `move_in_progress`), then checks the new version without building it
   (in the store, every hash of its manifest verified, compatible with the
   served one): a version that would be refused is refused before anyone
   moves, and the worker's memory holds one model, not two, while it checks.
2. It publishes the order. Every worker that holds the model (the API
   workers of the single layout; the model workers of the split layout,
   whose API workers follow with the model's shape) loads the new version
   beside the old one, verifies it, checks it, warms it up, then swaps in one
   step (one attribute assignment). A batch is run by whichever version was
   current when it started, and carries that version to the answer; the old
   version is freed when the last request using it finishes, and then the
   worker's heap is frozen again (`settle_heap`), as start-up froze it.
3. The caller waits until every live worker has reported on the order. If
   any refused, the previous version is ordered back, so the fleet never
   stays split, and the call says which worker refused and why.

A worker (re)started later reads the order and serves its version from the
start, so a restarted worker does not bring the old model back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from model import store
from model.atomic import atomic_write_bytes
from model.checkpoint import WEIGHTS_FILE, CheckpointError, Manifest, read_attached, read_manifest
from service.heap import settle_heap

POLL_SECONDS = 0.2  # how often a worker looks for a new order: the swap's latency, for a stat() call
RELEASE_WAIT_S = 30.0  # how long a worker waits for the requests still on the old version before refreezing


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

    @contextlib.contextmanager
    def exclusive_move(self, tag: str) -> Iterator[None]:
        """One move at a time, across every worker of this server: an flock on `move.lock` (per open
        file, so two threads of one worker exclude each other too; the kernel releases it if the
        holder dies). A second move meanwhile is refused at once (MoveRefused 409 move_in_progress)
        rather than queued: its caller learns what is moving, and decides."""
        with open(self.path / "move.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another version"
                raise MoveRefused(409, "move_in_progress",
                                  f"a move to {holder} is in progress; ask again when it has answered "
                                  "(`python -m training serve-version` waits its turn by itself)") from None
            try:
                lock.truncate(0)
                lock.write(tag)
                lock.flush()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def taking_turns(self, name: str) -> Iterator[None]:
        """One holder at a time across every worker of this server, the others waiting their turn: an
        flock on `<name>.lock`, like the moves' lock (per open file, so two threads of one worker take
        turns too; the kernel releases it if the holder dies), but queued rather than refused."""
        with open(self.path / f"{name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

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
    on any problem); `install(version)` swaps it in, in one step; `served()` (optional) is the
    version served now, so that the heap can be frozen again once the old one is released."""

    def __init__(self, control: ControlDir, role: str, tag: str, load: Callable[[str], Any],
                 install: Callable[[Any], None], served: Callable[[], Any] | None = None):
        self.control, self.role, self.tag = control, role, tag
        self.load, self.install, self.served = load, install, served
        self.generation = 0
        self.pid = os.getpid()  # whose report this is
        self._lock = threading.Lock()
        self._released: list[Callable[[], Any]] = []  # weak refs to the versions moved away from, until freed
        self._settle_by = 0.0  # when to refreeze even if one of them is still alive
        self.on_result: Callable[[str, float], None] = lambda result, seconds: None
        self.on_settled: Callable[[str, float], None] = _log_settled

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
                self.settle()
            except Exception:  # never let the follower die: the next order must still be heard
                pass

    def settle(self) -> str | None:
        """After a move, once the old version is freed (its last request done) or RELEASE_WAIT_S has
        passed: freeze the heap again (settle_heap). Returns how, or None while still waiting."""
        if not self._released:
            return None
        if any(ref() is not None for ref in self._released) and time.monotonic() < self._settle_by:
            return None
        started = time.perf_counter()
        how = settle_heap(released=all(ref() is None for ref in self._released))
        self._released = []
        self.on_settled(how, time.perf_counter() - started)
        return how

    def step(self) -> None:
        with self._lock:
            order = self.control.order()
            if order is None or order["generation"] == self.generation:
                return
            started = time.perf_counter()
            state, error = "serving", ""
            if order["tag"] != self.tag:
                try:
                    version = self.load(order["tag"])
                    old = self.served() if self.served else None
                    self.install(version)
                    del version
                    self.tag = order["tag"]
                    self._watch_release(old)
                except Exception as err:  # the old version keeps serving
                    state, error = "refused", f"{type(err).__name__}: {err}"
                self.on_result("ok" if state == "serving" else "refused", time.perf_counter() - started)
            self.generation = order["generation"]
            self.control.report(self._status(state, error, time.perf_counter() - started))

    def _watch_release(self, old: Any) -> None:
        """Remember the version moved away from, weakly, by what is heavy in it: its predictor. A
        version without one (the split layout's API workers, which keep recent versions known on
        purpose, service.backend.RemoteBackend) is not waited for."""
        heavy = getattr(old, "predictor", None)
        self._released.append(weakref.ref(heavy) if heavy is not None else lambda: None)
        self._settle_by = time.monotonic() + RELEASE_WAIT_S

    def _status(self, state: str, error: str = "", seconds: float = 0.0) -> WorkerStatus:
        return WorkerStatus(self.pid, self.role, self.tag, self.generation, state, error, round(seconds, 3))


def _log_settled(how: str, seconds: float) -> None:
    print(f"model version follower (pid {os.getpid()}): heap settled after the move ({how}, {seconds:.3f} s)",
          flush=True)


def follow_versions(holder, role: str, tag: str, control: ControlDir | None = None) -> VersionFollower:
    """Follow this server's orders (in `control`, by default this server's) from now on: `holder.load(tag)`
    builds a version beside the served one, `holder.install(version)` swaps it in,
    `holder.metrics.observe_swap(result, seconds)` counts moves; the served version is
    `holder.backend.current` (the API service) or `holder.current` (the model service)."""
    def served():
        return getattr(holder, "backend", holder).current

    follower = VersionFollower(control or ControlDir.for_this_server(), role, tag, holder.load, holder.install, served)
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


def request_move(control: ControlDir, tag: str, served: Callable[[], Any], expected_workers: int,
                 timeout_s: float, on_refused: Callable[[], None] = lambda: None) -> MoveResult:
    """The admin call's whole move, one at a time (ControlDir.exclusive_move): check `tag` against the
    version `served()` serves (at the lowest CPU priority: the requests being served keep the cores),
    then move every worker. Raises MoveRefused: 409 move_in_progress, or the check's refusal (then
    `on_refused()` is called, to count it)."""
    with control.exclusive_move(tag):
        version = served()  # read under the lock: the previous move, if any, is complete
        try:
            full_tag = _at_lowest_priority(check_candidate, tag, version.manifest)
        except MoveRefused:
            on_refused()
            raise
        return move_all(control, full_tag, version.tag, expected_workers, timeout_s)


def _at_lowest_priority(function: Callable, *args):
    """function(*args) in a thread of its own at nice 19 (a thread cannot lower its niceness again,
    so not in a pooled thread), waited for; its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        try:
            outcome["result"] = function(*args)
        except BaseException as err:  # noqa: BLE001 -- handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, name="model-version-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def check_candidate(tag: str, served: Manifest) -> str:
    """The full tag of a version the service could move to; raises Refusal-shaped errors
    (MoveRefused) for one it could not: missing (404 unknown_version), tampered or incomplete (422
    checkpoint_invalid), incompatible (422 incompatible_model). Verification only: the manifest
    read, every file's sha256 checked, compatibility checked, no model built (each worker builds
    it once, when it moves, and a worker whose build fails refuses the move: every worker then goes
    back, move_all)."""
    from bentoml.exceptions import NotFound

    try:
        path, full_tag = store.resolve(tag)
    except (NotFound, ValueError) as err:
        raise MoveRefused(404, "unknown_version", f"{tag!r} is not in the model store: {err}") from None
    try:
        check_compatible(served, verify_checkpoint(path))
    except CheckpointError as err:
        raise MoveRefused(422, "checkpoint_invalid", str(err)) from None
    except IncompatibleModel as err:
        raise MoveRefused(422, "incompatible_model", f"{full_tag}: {err}") from None
    return full_tag


HASH_CHUNK = 1 << 20


def verify_checkpoint(directory: Path) -> Manifest:
    """A checkpoint's manifest, once every file it lists is present and matches its sha256 (the
    weights streamed through the hash, 1 MiB at a time: nothing loaded, nothing built). The same
    refusals, in the same words, as model.checkpoint.load_checkpoint's integrity checks."""
    manifest = read_manifest(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        with open(weights_path, "rb") as weights:
            while chunk := weights.read(HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{weights_path}: {err.strerror or err}") from None
    if digest.hexdigest() != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights_path}: sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
            f"{manifest.weights_sha256[:16]}... (truncated, tampered or from another checkpoint)"
        )
    for name in manifest.files:
        read_attached(directory, manifest, name)  # every attached file present and intact
    return manifest


class MoveRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
