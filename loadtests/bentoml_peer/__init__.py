"""The benchmark's BentoML peer: torchvision's AlexNet served as BentoML's docs write a service
(service.py), and how the benchmark and the tests start it: `bentoml serve` of that module from the
repository root on a free loopback port, with a private BentoML home, stopped by process group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testkit.server import ROOT, ServerProcess

TARGET = "loadtests.bentoml_peer.service:PeerService"


def peer_command(port: int, host: str | None = "127.0.0.1") -> list[str]:
    host_args = ["--host", host] if host is not None else []
    return [str(Path(sys.executable).parent / "bentoml"), "serve", TARGET, *host_args, "--port", str(port)]


class PeerServer(ServerProcess):
    """ServerProcess (ready check, port retry, private home, stop) running the peer instead of this
    repository's service. Environment: PEER_DTYPE (fp32 | bf16 | auto), PEER_MAX_LATENCY_MS."""

    def _launch(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed by stop(), as ServerProcess does
        self.process = subprocess.Popen(peer_command(port, self._host), cwd=ROOT, env=self._env,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
