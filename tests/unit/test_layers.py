"""service/ is built in layers, and imports point one way: down (README, "The map of the code")."""

from __future__ import annotations

import ast
from pathlib import Path

from testkit.server import ROOT

# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = ["core", "control", "runtime", "oip", "http", "service"]


def _layer(module: str) -> str:
    """service.<layer>.<module> -> layer; service.service (the wiring at the top) -> "service"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "service"


def _service_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "service" or node.module in {f"service.{layer}" for layer in LAYERS}:
                found |= {f"{node.module}.{alias.name}" for alias in node.names}  # modules of a package
            elif node.module.startswith("service."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("service.")}
    return found


def test_every_module_of_the_service_sits_in_a_layer():
    for path in (ROOT / "service").rglob("*.py"):
        relative = path.relative_to(ROOT / "service").parts
        assert len(relative) == 1 and relative[0] in ("__init__.py", "service.py") or relative[0] in LAYERS, path


def test_imports_point_down_the_layers():
    upward = []
    for path in (ROOT / "service").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.endswith("__init__"):
            continue
        here = LAYERS.index(_layer(module))
        for imported in _service_imports(path):
            if LAYERS.index(_layer(imported)) > here:
                upward.append(f"{module} imports {imported}")
    assert not upward, upward
