"""How many client connections each API worker of this server is serving, shared between them.

The API workers share one listening socket (BentoML's circus socket), and a
connection belongs to whichever worker accepted it for as long as the client
keeps it alive. A burst of connections at once -- 32 clients starting
together -- can all land on one worker and stay there (seen: 28 on one and 4
on the other for a whole run, 30 and 2 in another): that worker's event loop
is then the bottleneck while the other idles, and the batches each forms are
a few images. service.http.guards.SpreadConnections reads this board to tell when
its worker holds more than its share, and closes the excess connections one
answer at a time; the clients reconnect, and the accept goes to a worker that
is free to take it first -- the less busy one.

A worker counts its *active* connections: those that sent a request in the
last `WINDOW_S`, an idle keep-alive connection costs nothing. Each worker has
a slot in a small file in the server's control directory, memory-mapped:
(active connections, when it was written); a slot not written within the
window (a worker with no traffic, or one that died) counts as none.
"""

from __future__ import annotations

import math
import mmap
import struct
import time
from collections import OrderedDict
from pathlib import Path

_SLOT = struct.Struct("<qd")  # active connections, time.monotonic() when written (system-wide clock)


class ConnectionBoard:
    # A connection counts while it sent a request this recently: longer than a batch client waits for its
    # answer (8-image requests under a 3 s budget), so steady clients do not flicker out between requests.
    WINDOW_S = 5.0

    def __init__(self, path: Path, workers: int, slot: int, clock=time.monotonic):
        self.workers, self.slot, self._clock = workers, slot, clock
        size = workers * _SLOT.size
        with open(path, "a+b") as file:  # every worker opens (and sizes) it; the map outlives the file object
            if file.seek(0, 2) < size:
                file.truncate(size)
            self._map = mmap.mmap(file.fileno(), size)
        self._seen: OrderedDict = OrderedDict()  # this worker's connections -> last request, oldest first

    def saw(self, connection) -> None:
        """A request arrived on `connection` (its client address)."""
        now = self._clock()
        self._seen[connection] = now
        self._seen.move_to_end(connection)
        while self._seen and now - next(iter(self._seen.values())) > self.WINDOW_S:
            self._seen.popitem(last=False)
        self._publish(now)

    def forget(self, connection) -> None:
        """`connection` is being closed."""
        self._seen.pop(connection, None)
        self._publish(self._clock())

    def over_share(self) -> bool:
        """This worker serves more active connections than its share of all the workers' together."""
        return len(self._seen) > math.ceil(self.active() / self.workers)

    def active(self) -> int:
        """The active connections of every worker together (a slot not written within WINDOW_S: none)."""
        now, total = self._clock(), 0
        for index in range(self.workers):
            count, written = _SLOT.unpack_from(self._map, index * _SLOT.size)
            if now - written <= self.WINDOW_S:
                total += count
        return total

    def _publish(self, now: float) -> None:
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, len(self._seen), now)
