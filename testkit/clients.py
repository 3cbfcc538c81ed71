"""Clients in background threads, sending requests until their block ends (the tests' load)."""

from __future__ import annotations

import threading


class BackgroundClients:
    """`clients` threads, each running `self._client(index)` while `self.running()`; what they record goes in
    `self.answers`. Started and stopped (and joined) by a `with` block."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def running(self) -> bool:
        return not self._stop.is_set()

    def _client(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()
