"""Security properties checked on the source and the packaging, where a running test cannot show them."""

from __future__ import annotations

import ast
import re
import tomllib

import pytest
import torch

from testkit.server import ROOT

PACKAGES = ("model", "training", "service", "loadtests", "testkit")
SOURCES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
# Modules that unpickle (or run code from) what they read.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_nothing_is_unpickled(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {alias.name.split(".")[0] for alias in node.names} & UNSAFE_MODULES, ast.unparse(node)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in UNSAFE_MODULES, ast.unparse(node)
    for call, name in _calls(tree):
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name == "torch.load":  # a pickle underneath: only with the allow-list of plain tensors and containers
            assert keywords.get("weights_only") == "True", f"{path}:{call.lineno} torch.load without weights_only=True"
        if name.endswith(("np.load", "numpy.load")):
            assert keywords.get("allow_pickle", "False") == "False", f"{path}:{call.lineno}"
        if name in ("yaml.load", "yaml.unsafe_load", "eval", "exec"):
            raise AssertionError(f"{path}:{call.lineno}: {name}")


def test_training_state_loads_without_arbitrary_pickles(tmp_path):
    """train_state.pt refuses a pickled object, so a tampered file cannot run code on --resume."""
    from training.state import STATE_FILE, load_state

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"progress": Payload()}, tmp_path / STATE_FILE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state(tmp_path)


def test_dependencies_are_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    loose = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", r)]
    assert not loose, f"not pinned: {loose}"


def test_service_binds_loopback_and_only_the_container_opens_up():
    service = (ROOT / "service" / "service.py").read_text()
    assert 'http={"host": "127.0.0.1"}' in service
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"--host", "0.0.0.0"' in dockerfile
