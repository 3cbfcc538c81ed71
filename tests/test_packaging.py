"""Packaging: Dockerfile, bentofile, pinned requirements, CI entry point."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from testkit.server import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_a_cuda_runtime_image_serving_as_non_root():
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"HEALTHCHECK .*\n?.*/readyz", DOCKERFILE)
    assert re.search(r"^EXPOSE 3000$", DOCKERFILE, re.M)
    assert re.search(r'^CMD \["bentoml", "serve"', DOCKERFILE, re.M)
    assert "--gpus all" in DOCKERFILE  # the run command is documented where the image is defined


def test_requirements_txt_matches_pyproject_pins():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [
        line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert requirements == pyproject["project"]["dependencies"]
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make serve" in readme


@pytest.mark.slow
def test_bentoml_build_packages_service_and_model(cli_env, registered_model):
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    result = subprocess.run([str(bentoml_cli), "build", "."], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listing = subprocess.run([str(bentoml_cli), "list"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert "cnn_service" in listing.stdout
    models = subprocess.run([str(bentoml_cli), "get", "cnn_service:latest", "-o", "json"], env=cli_env,
                            capture_output=True, text=True, timeout=120)
    assert registered_model.split(":")[1] in models.stdout
