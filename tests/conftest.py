"""Shared helpers: run the project's real CLIs in subprocesses, with an isolated model store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small enough for seconds on 2 CPU cores, big enough to learn well above chance (1/12).
TINY_TRAIN = ["--data", "shapes", "--preset", "small", "--shapes-per-class", "96", "--batch-size", "32"]
ATLAS_PER_CLASS = 20  # the tiny run's atlas: 240 generated test images


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    """A private BentoML home so tests never touch the user's model store."""
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="session")
def cli_env(bentoml_home) -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(bentoml_home)
    env["BENTOML_DO_NOT_TRACK"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env):
    def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def tiny_run(run_cli, tmp_path_factory) -> Path:
    """A real training run through the CLI, shared by the tests that need a checkpoint; with its
    channel atlas, as `make serve`'s default model has one."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_cli("training", *TINY_TRAIN, "--epochs", "4", "--out", str(out))
    run_cli("training", "atlas", str(out), "--data", "shapes", "--shapes-per-class", str(ATLAS_PER_CLASS))
    return out


@pytest.fixture(scope="session")
def registered_model(tiny_run, run_cli) -> str:
    result = run_cli("training", "register", str(tiny_run))
    return result.stdout.strip().split()[-1]


def start_server(env: dict[str, str], log_dir: Path, **extra_env: str):
    from loadtests.server import ServerProcess

    server = ServerProcess({**env, **extra_env}, log_dir / "server.log")
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def server(cli_env, registered_model, tmp_path_factory):
    """The real service, serving the tiny model from the (private) model store."""
    log_dir = tmp_path_factory.mktemp("server")
    server = start_server(cli_env, log_dir, MAX_BODY_BYTES=str(3 * 1024 * 1024), MAX_IMAGES_PER_REQUEST="16")
    yield server
    server.stop()


API_KEY = "s3cret-key"


@pytest.fixture(scope="session")
def secured_server(cli_env, registered_model, tmp_path_factory):
    """The real service with API_KEY set."""
    server = start_server(cli_env, tmp_path_factory.mktemp("secured"), API_KEY=API_KEY)
    yield server
    server.stop()


def serve_until_exit(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`bentoml serve` for a start-up that must fail; a private home keeps the
    session server's metrics directory intact (see loadtests.server.private_home)."""
    import shutil

    from loadtests.server import free_port, private_home

    env, home = private_home(env)
    try:
        return subprocess.run([str(Path(sys.executable).parent / "bentoml"), "serve", ".", "--port", str(free_port())],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(home, ignore_errors=True)
