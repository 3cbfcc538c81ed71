"""A real Prometheus (Debian's package) on loopback, scraping replicas of the service every second.

Targets come from a file (file_sd), rewritten as replicas come and go: Prometheus sees the change
within a second, and a target that leaves gets stale markers, so instant queries stop counting
it at once. The job is `cnn-service`, as in ops/prometheus.yml and the Kubernetes scrape job,
because the dashboard and the alert rules select it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from testkit.server import ROOT, free_port, terminate

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
JOB = "cnn-service"
ALERTS = ROOT / "ops" / "alerts.yml"


class Prometheus:
    def __init__(self, workdir: Path, rule_files: tuple[Path, ...] = (ALERTS,)):
        self.targets_path = workdir / "targets.json"
        self.set_targets({})
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": JOB, "file_sd_configs": [
                {"files": [str(self.targets_path)], "refresh_interval": "1s"}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 60
        while not self._ready():
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"prometheus did not start:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def set_targets(self, targets: dict[str, str], extra_labels: dict[str, dict[str, str]] | None = None) -> None:
        """Scrape exactly these targets: {name: "127.0.0.1:port"}; each gets the label replica=name, and
        extra_labels[name] if given. Written atomically: Prometheus never reads half a file."""
        groups = [{"targets": [address], "labels": {"replica": name, **(extra_labels or {}).get(name, {})}}
                  for name, address in sorted(targets.items())]
        partial = self.targets_path.with_suffix(".tmp")
        partial.write_text(json.dumps(groups))
        partial.replace(self.targets_path)

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now; raises on a PromQL error."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if body["status"] != "success":
            raise ValueError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 30) -> list[dict]:
        """Poll `expr` until predicate(result) holds; the result."""
        deadline = time.time() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.time() > deadline:
                raise TimeoutError(f"{expr}: still {result} after {timeout}s")
            time.sleep(0.25)

    def scraped_since(self, moment: float, timeout: float = 30) -> None:
        """Wait until every live target has been scraped after `moment` (epoch seconds)."""
        self.wait_for(f'timestamp(up{{job="{JOB}"}})',
                      lambda result: bool(result) and all(float(r["value"][1]) > moment for r in result), timeout)

    def rules(self) -> list[dict]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        terminate(self.process, grace_s=30)
        self._log.close()
