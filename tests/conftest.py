"""Shared helpers: run the project's real CLIs in subprocesses, with an isolated model store."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.models import ATLAS_PER_CLASS, TINY_TRAIN
from testkit.server import API_KEY, ROOT, start_server


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


@pytest.fixture(scope="session")
def server(cli_env, registered_model, tmp_path_factory):
    """The real service, serving the tiny model from the (private) model store."""
    log_dir = tmp_path_factory.mktemp("server")
    server = start_server(cli_env, log_dir, MAX_BODY_BYTES=str(3 * 1024 * 1024), MAX_IMAGES_PER_REQUEST="16")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def otlp_receiver():
    """A real OTLP/HTTP trace receiver the traced servers export to (testkit.otlp)."""
    from testkit.otlp import OtlpReceiver

    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


# Traces on (every one kept) and the JSON access log: as an operator runs the service in production.
TRACED = {"TRACING_SAMPLE_RATE": "1.0", "ACCESS_LOG": "json"}


@pytest.fixture(scope="session")
def secured_server(cli_env, registered_model, otlp_receiver, tmp_path_factory):
    """The real service with API_KEY set, traced (tests/test_observability.py reads its spans and log)."""
    server = start_server(cli_env, tmp_path_factory.mktemp("secured"), API_KEY=API_KEY,
                          TRACING_ENDPOINT=otlp_receiver.url, **TRACED)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def split_server(cli_env, registered_model, otlp_receiver, tmp_path_factory):
    """Two API workers calling one batched model worker through bentoml.depends; traced; with an admin key
    (tests/test_rollout.py runs a rollout on it, and leaves it on its version)."""
    server = start_server(cli_env, tmp_path_factory.mktemp("split"), LAYOUT="split", API_WORKERS="2",
                          TRACING_ENDPOINT=otlp_receiver.url, ADMIN_KEY="change-me", **TRACED)
    yield server
    server.stop()


# ----- the precision a server computes in ----------------------------------------------------

FP32_PROBABILITY_TOLERANCE = 1e-5  # two fp32 computations of one probability (summation order only)


@dataclass(frozen=True)
class ServedPrecision:
    """What a running server computes in (PRECISION=auto picks per machine: bf16 where the CPU has
    it natively and the checkpoint's recorded agreement allows, else fp32; PRECISION=fp32|bf16
    forces one), and how far two computations of the same probability may differ in it.

    Tests that compare numbers across endpoints, processes or paths ask the server which
    precision it chose, compute their expectation in the same one, and allow that precision's
    tolerance: fp32's rounding, or for a reduced precision the largest probability difference
    the checkpoint recorded against fp32 on its test split (a bound on the scale of bf16's
    rounding for this model; two bf16 computations differ far less than bf16 and fp32)."""

    name: str  # fp32 | bf16 | fp16
    probability_tolerance: float

    @classmethod
    def of(cls, url: str, manifest) -> ServedPrecision:
        import httpx

        name = httpx.get(f"{url}/model", timeout=30).json()["precision"]["name"]
        if name == "fp32":
            return cls(name, FP32_PROBABILITY_TOLERANCE)
        recorded = (manifest.training.get("precision_agreement") or {}).get(name)
        assert recorded, f"the checkpoint records no {name} agreement with fp32"
        return cls(name, max(FP32_PROBABILITY_TOLERANCE, recorded["max_probability_difference"]))

    def predictor(self, checkpoint):
        """The checkpoint in this process, computing as the server does."""
        import torch

        from model.inference import Predictor

        return Predictor(checkpoint, torch.device("cpu"), self.name)


@pytest.fixture(scope="session")
def served_precision(server, tiny_run) -> ServedPrecision:
    from model.checkpoint import read_manifest

    return ServedPrecision.of(server.url, read_manifest(tiny_run))


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def server_in_each_precision(request, server, cli_env, tiny_run, tmp_path_factory) -> tuple:
    """The real service computing in fp32, then in bf16 (whatever PRECISION=auto picks on this
    machine, both are tested): the session's server where it already computes in that precision,
    else one started with PRECISION forced. bf16 runs on any CPU (emulated, slower, without
    AVX-512 BF16 or AMX)."""
    from model.checkpoint import read_manifest

    manifest = read_manifest(tiny_run)
    if ServedPrecision.of(server.url, manifest).name == request.param:
        yield server, ServedPrecision.of(server.url, manifest)
        return
    other = start_server(cli_env, tmp_path_factory.mktemp(f"server_{request.param}"), PRECISION=request.param,
                         API_WORKERS="1")
    precision = ServedPrecision.of(other.url, manifest)
    assert precision.name == request.param
    yield other, precision
    other.stop()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Image files as a client has them: a JPEG photo-like shape and a PNG (BentoML's clients upload paths)."""
    from testkit.images import encode, shape_image, shape_png

    folder = tmp_path_factory.mktemp("client_images")
    made = {"cat.jpg": encode(shape_image(5, size=120), "JPEG", quality=90), "dog.png": shape_png(9, size=80)}
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in made}
