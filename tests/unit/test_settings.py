"""The service's settings: one typed class, read from the environment, documented in docs/serving.md."""

from __future__ import annotations

import re

import pytest

from service.core.settings import ServiceConfig
from testkit.server import ROOT

NOT_OURS = {"TMPDIR"}  # the system's, read by BentoML; documented for what it does to uploads


def _table() -> dict[str, str]:
    """docs/serving.md's settings table: each variable its row names, with its cell of defaults
    (a row of `A` / `B` gives A the first default and B the second)."""
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text[text.index("## Configuration"):text.index("## How a request is served")]
    found = {}
    for row in re.findall(r"^\| (`[A-Z_]+`(?: / `[A-Z_]+`)*) \| ([^|]*) \|", section, re.M):
        names = re.findall(r"`([A-Z_]+)`", row[0])
        defaults = [d.strip() for d in row[1].split(" / ")] if len(names) > 1 else [row[1].strip()]
        found.update(zip(names, defaults if len(defaults) == len(names) else [row[1].strip()] * len(names)))
    return found


def test_every_setting_is_documented_and_every_documented_variable_is_a_setting():
    documented, declared = set(_table()), set(ServiceConfig.variables()) - {"AUTOCAST"}  # in PRECISION's row
    assert declared - documented == set(), "settings missing from docs/serving.md"
    assert documented - declared - NOT_OURS == set(), "documented variables the service does not read"


def test_documented_numeric_defaults_are_the_classes():
    table, declared = _table(), ServiceConfig.variables()
    checked = 0
    for name, default in declared.items():
        if isinstance(default, (int, float)) and not isinstance(default, bool) and default and name in table:
            if name in ("ADMISSION_WAIT_MS", "ADMISSION_BATCHES"):  # documented as the rule that derives them
                continue
            assert table[name] == (f"{default:g}" if isinstance(default, float) else str(default)), (name, table[name])
            checked += 1
    assert checked >= 10


def test_settings_are_read_from_the_environment_with_derived_defaults(monkeypatch):
    monkeypatch.setenv("MAX_LATENCY_MS", "300")
    monkeypatch.setenv("LAYOUT", "Split")
    monkeypatch.setenv("API_KEY", "")  # empty: unset
    monkeypatch.delenv("PRECISION", raising=False)
    monkeypatch.setenv("AUTOCAST", "off")  # the deprecated setting still works
    config = ServiceConfig.from_env()
    assert (config.max_latency_ms, config.admission_wait_ms, config.layout) == (300, 45, "split")
    assert config.api_key is None and config.precision == "fp32"
    monkeypatch.setenv("PRECISION", "bf16")
    assert ServiceConfig.from_env().precision == "bf16"  # PRECISION wins over AUTOCAST


def test_a_bad_value_stops_start_up_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "lots")
    with pytest.raises(SystemExit, match=r"MAX_BATCH_SIZE='lots'"):
        ServiceConfig.from_env()
    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("MAX_LATENCY_MS", "soon")  # what other settings derive from: named all the same
    with pytest.raises(SystemExit, match=r"MAX_LATENCY_MS='soon'"):
        ServiceConfig.from_env()
    monkeypatch.delenv("MAX_LATENCY_MS")
    monkeypatch.setenv("MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit, match=r"MAX_BATCH_SIZE='0': Input should be greater than or equal to 1"):
        ServiceConfig.from_env()
