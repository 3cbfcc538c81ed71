"""tests/unit: no server and no training run, so that `make test-fast` takes seconds. A test here that
starts `bentoml serve` fails, pointing to where it belongs."""

from __future__ import annotations

import pytest

from testkit import server


@pytest.fixture(autouse=True)
def _no_servers(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests/unit starts no server: put this test beside the end-to-end ones in tests/")

    monkeypatch.setattr(server.ServerProcess, "_launch", refuse)
    monkeypatch.setattr(server, "serve_until_exit", refuse)
