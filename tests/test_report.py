"""`make report`'s command, run for a few seconds against a server it starts (the small model): its CSV,
Markdown and plots are written and agree with one another."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from PIL import Image

from service.core.timeline import STAGES
from testkit.server import ROOT

pytestmark = pytest.mark.slow


def test_the_capacity_report_writes_consistent_csv_markdown_and_plots(cli_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.report", "--clients", "1", "4", "--images", "1", "2", "--seconds", "1.5",
         "--settle", "0.5", "--budget-ms", "1000", "--out", str(tmp_path)],
        cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with (tmp_path / "capacity.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["clients"]), int(r["images_per_request"])) for r in rows] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    for row in rows:
        number = {key: float(value) for key, value in row.items() if key != "within_budget"}
        assert number["images_per_s"] == pytest.approx(number["requests_per_s"] * number["images_per_request"])
        assert 0 < number["p50_ms"] <= number["p90_ms"] <= number["p95_ms"] <= number["p99_ms"]
        assert 0 <= number["share_503"] <= 1
        assert 1 <= number["mean_batch_size"] <= number["clients"] * number["images_per_request"]
        assert number["server_cpu_ms_per_image"] > 0 and number["server_rss_mb"] > 0
        stages = [number[f"{stage}_ms"] for stage in STAGES]
        assert all(value >= 0 for value in stages) and sum(stages) > 0
        assert row["within_budget"] == str(number["p99_ms"] <= 1000)
    markdown = (tmp_path / "capacity.md").read_text()
    within = [r for r in rows if r["within_budget"] == "True"]
    if within:  # the named step is the fastest of those within the budget, as the CSV has it
        best = max(within, key=lambda r: float(r["images_per_s"]))
        assert f"Highest throughput within it: {float(best['images_per_s']):.1f} images/s" in markdown
    else:
        assert "No step kept its p99 within the budget" in markdown
    assert markdown.count("\n| ") == 2 + len(rows)  # the header, its rule and one line per step
    for name in ("capacity_curve.png", "capacity_breakdown.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300
    assert "highest throughput within the budget" in result.stdout
