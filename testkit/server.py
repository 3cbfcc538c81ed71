"""Start the real service with `bentoml serve` on a free loopback port, stop it by PID.

The one place that knows how this repository is served: tests and load tests start servers here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "s3cret-key"  # the key the tests' secured server runs with


def serve_command(port: int, host: str | None = None) -> list[str]:
    """`bentoml serve` of this repository (run it with cwd=ROOT); host None: the service's default bind."""
    host_args = ["--host", host] if host is not None else []
    return [str(Path(sys.executable).parent / "bentoml"), "serve", ".", *host_args, "--port", str(port)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_kind(command: str) -> str:
    """What a process of a `bentoml serve` tree is, from its command line: "model" (a worker of
    the split layout's model service, cnn_model), "api" (an API worker) or "other" (the supervisor
    and helpers). BentoML names its worker entry module in the command line; that name is matched
    here and nowhere else, so a BentoML release that renames it needs one change."""
    if "cnn_model" in command:
        return "model"
    return "api" if "_bentoml_impl.worker" in command else "other"


def is_ready(url: str, timeout: float = 2) -> bool:
    """GET /readyz answers 200 (BentoML: the service loaded its model and warmed up)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_ready(url: str, timeout: float, alive=lambda: True) -> bool:
    """Poll /readyz until it answers 200 (True), `timeout` passes or `alive()` turns False."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        if is_ready(url):
            return True
        time.sleep(0.3)
    return False


def private_home(env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """`env` with a BENTOML_HOME of its own that shares the model store of `env`'s.

    `bentoml serve` empties BENTOML_HOME/prometheus_multiproc_dir when it
    starts, so a second server on the same home (a load test next to `make
    serve`, a test server next to another) would wipe the first one's metrics.
    A private home whose `models` links to the shared store avoids that.
    """
    shared = Path(env.get("BENTOML_HOME") or Path.home() / "bentoml")
    (shared / "models").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    (home / "models").symlink_to((shared / "models").resolve(), target_is_directory=True)
    return {**env, "BENTOML_HOME": str(home)}, home


class ServerProcess:
    """`bentoml serve` of this repository on `host` (None: the service's own
    default bind, which is loopback) and a free port, with a private home.

    A free port is found by binding port 0 and closing it, so another process
    can take it before `bentoml serve` binds it; a start that fails on an
    address in use is retried on a new port (unless the caller fixed the port)."""

    PORT_ATTEMPTS = 3

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None,
                 host: str | None = "127.0.0.1"):
        self._fixed_port = port
        self._host = host
        self.log_path = log_path
        env, self._home = private_home(env)
        self._env = env
        self._launch(port or free_port())

    def _launch(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            serve_command(port, self._host), cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop it and every worker together
        )

    def wait_ready(self, timeout: float = 120) -> None:
        for _ in range(self.PORT_ATTEMPTS):
            if wait_until_ready(self.url, timeout, alive=lambda: self.process.poll() is None):
                return
            if self.process.poll() is None:
                break
            if self._fixed_port is not None or "address already in use" not in self.log().lower():
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            self._log.close()
            self._launch(free_port())  # lost the port to another process: take another
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def ready(self) -> bool:
        return is_ready(self.url)

    def worker_pids(self) -> list[int]:
        import psutil

        return sorted(p.pid for p in psutil.Process(self.process.pid).children(recursive=True))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        shutil.rmtree(self._home, ignore_errors=True)


def terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a child process, and SIGKILL it if it has not exited within `grace_s` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(env: dict[str, str], log_dir: Path, **extra_env: str) -> ServerProcess:
    """A ready server with `extra_env` on top of `env`, logging to log_dir/server.log."""
    server = ServerProcess({**env, **extra_env}, log_dir / "server.log")
    server.wait_ready()
    return server


def serve_until_exit(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`bentoml serve` for a start-up that must fail; a private home keeps the
    other servers' metrics directories intact (see private_home)."""
    env, home = private_home(env)
    try:
        return subprocess.run(serve_command(free_port()), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        shutil.rmtree(home, ignore_errors=True)
