"""The control directory: the files a server's workers share, private to that server.

`bentoml serve` runs several worker processes behind one port, so an HTTP call
reaches one of them. What they must agree on lives in a directory private to
this server (created by its first worker, mode 0700, named after the
`bentoml serve` process every worker is a child of):

  order.json          what every worker should serve: {"generation", "tag", "previous"}
  worker-<pid>.json   what each worker serves, the last order it acted on, and how
  move.lock           one model move at a time (`exclusive_move`)
  <name>.lock         turns at something one worker does at a time (`taking_turns`: the attributions)
  connections         the workers' connection counts (service.http.connection_board)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from model.atomic import atomic_write_bytes
from service.core.refusals import Refusal


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
            pid = stale.name.removeprefix(cls.PREFIX)
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return cls(cls.for_server(os.getppid()))

    @classmethod
    def for_server(cls, server_pid: int) -> Path:
        """Where the control directory of the `bentoml serve` process `server_pid` is."""
        return Path(tempfile.gettempdir()) / f"{cls.PREFIX}{server_pid}"

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
        holder dies). A second move meanwhile is refused at once (a Refusal: 409 move_in_progress)
        rather than queued: its caller learns what is moving, and decides."""
        with open(self.path / "move.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another version"
                raise Refusal(409, "move_in_progress",
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
        return self.live_reports("worker-*.json", WorkerStatus)

    def live_reports(self, pattern: str, kind: type) -> list:
        """The JSON files matching `pattern`, each as `kind(**fields)` (which has a `pid`), of live processes
        only: a dead process's file is removed; one being replaced or unreadable is skipped."""
        found = []
        for file in sorted(self.path.glob(pattern)):
            try:
                report = kind(**json.loads(file.read_text()))
            except (FileNotFoundError, ValueError, TypeError):
                continue
            if process_alive(report.pid):
                found.append(report)
            else:
                file.unlink(missing_ok=True)
        return found


def process_alive(pid: int) -> bool:
    """Is there a process `pid` (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
