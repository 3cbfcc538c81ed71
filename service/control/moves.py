"""The admin call's side of a model move: check the version, order it, wait for every worker.

1. The admin call (POST /admin/model, `python -m training serve-version`)
   lands on one worker, which takes the moves' lock (ControlDir.exclusive_move:
   one move at a time across every worker; a second call meanwhile is answered
   409 `move_in_progress`), then checks the new version without building it
   (in the store, every hash of its manifest verified, compatible with the
   served one): a version that would be refused is refused before anyone
   moves, and the worker's memory holds one model, not two, while it checks.
2. It publishes the order; every worker moves (service.control.follower).
3. The caller waits until every live worker has reported on the order. If
   any refused, the previous version is ordered back, so the fleet never
   stays split, and the call says which worker refused and why.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from model import store
from model.checkpoint import CheckpointError, IncompatibleModel, Manifest, check_compatible, verify_checkpoint
from service.control.control_dir import ControlDir, WorkerStatus
from service.control.follower import POLL_SECONDS
from service.core.priority import lower_this_thread
from service.core.refusals import Refusal


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
    then move every worker. Raises a Refusal: 409 move_in_progress, or the check's refusal (then
    `on_refused()` is called, to count it)."""
    with control.exclusive_move(tag):
        version = served()  # read under the lock: the previous move, if any, is complete
        try:
            full_tag = _at_lowest_priority(check_candidate, tag, version.manifest)
        except Refusal:
            on_refused()
            raise
        return move_all(control, full_tag, version.tag, expected_workers, timeout_s)


def _at_lowest_priority(function: Callable, *args):
    """function(*args) in a thread of its own at nice 19 (a thread cannot lower its niceness again,
    so not in a pooled thread), waited for; its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        lower_this_thread()
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
    """The full tag of a version the service could move to; raises a Refusal
    for one it could not: missing (404 unknown_version), tampered or incomplete (422
    checkpoint_invalid), incompatible (422 incompatible_model). Verification only: the manifest
    read, every file's sha256 checked, compatibility checked, no model built (each worker builds
    it once, when it moves, and a worker whose build fails refuses the move: every worker then goes
    back, move_all)."""
    from bentoml.exceptions import NotFound

    try:
        path, full_tag = store.resolve(tag)
    except (NotFound, ValueError) as err:
        raise Refusal(404, "unknown_version", f"{tag!r} is not in the model store: {err}") from None
    try:
        check_compatible(served, verify_checkpoint(path))
    except CheckpointError as err:
        raise Refusal(422, "checkpoint_invalid", str(err)) from None
    except IncompatibleModel as err:
        raise Refusal(422, "incompatible_model", f"{full_tag}: {err}") from None
    return full_tag
