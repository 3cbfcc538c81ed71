"""Run Locust headless against a server, as the load tests, the replicas rehearsal and the
model-update scenario do: the command line and environment, and reading its results back."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from testkit.server import ROOT


def locust_command(scenario: dict, host: str, reports: Path) -> tuple[list[str], dict[str, str]]:
    """The headless Locust command line and environment for a scenario; the outcome summary goes to
    reports/<name>_summary.json, Locust's CSV to reports/<name>_stats.csv."""
    name = scenario["_name"]
    summary_path = reports / f"{name}_summary.json"
    env = {
        **os.environ,
        "LOCUST_SUMMARY": str(summary_path),
        "LOCUST_WAIT": scenario.get("wait", "0.1,0.5"),
        "LOCUST_WEIGHTS": scenario.get("weights", ""),
    }
    if scenario.get("throughput_per_user"):
        env["LOCUST_THROUGHPUT"] = str(scenario["throughput_per_user"])
    if scenario.get("honor_retry_after"):
        env["LOCUST_HONOR_RETRY_AFTER"] = "1"
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
        "--host", host, "-u", str(scenario["users"]), "-r", str(scenario["spawn_rate"]),
        "-t", str(scenario["duration"]), "--csv", str(reports / name), "--html", str(reports / f"{name}.html"),
        "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]
    return command, env


def locust_results(scenario: dict, reports: Path) -> tuple[dict, dict]:
    """The outcome summary and Locust's aggregated stats row of a finished run."""
    name = scenario["_name"]
    with open(reports / f"{name}_stats.csv") as stats_file:
        aggregated = next(row for row in csv.DictReader(stats_file) if row["Name"] == "Aggregated")
    return json.loads((reports / f"{name}_summary.json").read_text()), aggregated
