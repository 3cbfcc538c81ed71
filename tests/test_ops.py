"""Ops assets checked by the real tools: promtool, and a real Prometheus scraping the real service."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from testkit.images import shape_png
from testkit.aggregation import alert_expressions, dashboard_expressions
from testkit.server import ROOT, free_port

OPS = ROOT / "ops"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system-deps)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)")


@needs_promtool
@pytest.mark.parametrize("args", [
    ["check", "config", str(OPS / "prometheus.yml")],
    ["check", "rules", str(OPS / "alerts.yml")],
    ["test", "rules", str(OPS / "alerts_test.yml")],
])
def test_promtool_accepts_config_rules_and_alert_tests(args):
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=OPS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_datasource():
    datasource = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads((OPS / "grafana/dashboards/cnn-service.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "batch size", "forward vs preprocess", "class", "confidence",
                  "feature-map bytes", "gpu memory", "errors"):
        assert topic in titles


def test_compose_runs_service_prometheus_and_grafana_from_repo_files():
    compose = yaml.safe_load((OPS / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"service", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (OPS / source).exists(), source


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A real Prometheus on loopback, scraping the test server every second, with our alert rules."""
    directory = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    target = server.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OPS / "alerts.yml")],
        "scrape_configs": [{"job_name": "cnn-service", "static_configs": [{"targets": [target]}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(directory / "prometheus.log", "wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(prometheus_url: str, expr: str) -> dict:
    return httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()


def wait_for(prometheus_url: str, expr: str, seconds: float = 30) -> list:
    deadline = time.time() + seconds
    while time.time() < deadline:
        result = query(prometheus_url, expr)
        if result["status"] == "success" and result["data"]["result"]:
            return result["data"]["result"]
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr}")


@needs_prometheus
def test_prometheus_scrapes_the_service_and_every_expression_evaluates(prometheus, server):
    assert wait_for(prometheus, 'up{job="cnn-service"} == 1')
    files = [("images", ("shape.png", shape_png(3), "image/png"))]
    for _ in range(8):  # spread over several scrapes, so rates see the counters move
        assert httpx.post(f"{server.url}/classify", files=files, timeout=30).status_code == 200
        time.sleep(0.5)
    info = wait_for(prometheus, 'cnn_model_info{job="cnn-service"}')
    assert info[0]["metric"]["device"] == "cpu"
    assert wait_for(prometheus, 'sum(rate(cnn_images_processed_total{job="cnn-service", endpoint="classify"}[1m])) > 0')
    for expr in dashboard_expressions() + list(alert_expressions().values()):
        result = query(prometheus, expr.replace("$__rate_interval", "1m"))
        assert result["status"] == "success", (expr, result)
    # the dashboard's request-rate panel really shows traffic
    assert query(prometheus, dashboard_expressions()[0].replace("$__rate_interval", "1m"))["data"]["result"]


@needs_prometheus
def test_prometheus_loads_and_evaluates_the_alert_rules(prometheus):
    deadline = time.time() + 30
    while time.time() < deadline:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("health") == "ok" for rule in rules):
            break
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == set(alert_expressions())
    assert all(rule["health"] == "ok" for rule in rules), rules
