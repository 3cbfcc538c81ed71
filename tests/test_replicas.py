"""Replicas on one machine, for real: two `bentoml serve` processes behind haproxy, health-checked on
/readyz, scraped by a real Prometheus, under Locust load (testkit.replicas)."""

from __future__ import annotations

import shutil
import time

import pytest

from testkit.metrics import metric_samples, metric_sum
from testkit.replicas import SLOW_UPLOADS, Fleet, Load, requests_all_succeed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (make system-deps)"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (make system-deps)"),
]

REPLICA_ENV = {"API_WORKERS": "1", "TORCH_THREADS": "1"}  # two small "pods" on two cores
USERS = 4  # paced clients (0.05-0.3 s between requests): ~20 requests/s, well under two replicas' capacity


@pytest.fixture(scope="module")
def fleet(cli_env, registered_model, tmp_path_factory):
    with Fleet({**cli_env, **REPLICA_ENV}, tmp_path_factory.mktemp("replicas"), replicas=2) as fleet:
        yield fleet


def test_rolling_replacement_under_load_loses_no_request(fleet, tmp_path):
    old = dict(fleet.instances())
    load = Load(fleet.balancer.url, tmp_path, "rollout", USERS)
    began = time.time()
    try:
        time.sleep(3)
        rolls = [fleet.roll(slot) for slot in list(old)]  # one at a time, each new one ready before the old goes
        time.sleep(1)
    finally:
        outcome = load.stop()
    assert outcome["ok"] > 50
    assert (outcome["error"], outcome["shed"]) == (0, 0), outcome["endpoints"]
    assert fleet.failed_since(began) == []  # nor did the balancer see any failure
    assert not set(fleet.instances().values()) & set(old.values())  # every replica is a new process
    assert sorted(fleet.balancer.serving()) == sorted(fleet.servers)
    for server in fleet.servers.values():  # and each new one served
        assert metric_sum(metric_samples(server.url), "cnn_images_processed_total") > 0
    for roll in rolls:
        assert roll.drain_s < 30 and roll.exit_s < 30, roll  # within REQUEST_TIMEOUT_S, as the Deployment assumes


def test_sigkill_fails_at_most_the_requests_in_flight_and_the_replica_comes_back(fleet, tmp_path):
    slot = next(iter(fleet.servers))
    instance = fleet.instances()[slot]
    load = Load(fleet.balancer.url, tmp_path, "kill", USERS)
    try:
        time.sleep(3)
        kill = fleet.kill(slot)
        time.sleep(2)
    finally:
        outcome = load.stop()
    # killed while it held requests: the slow uploads pinned to it, which fail, and maybe some of the load's
    assert kill.in_flight >= SLOW_UPLOADS and len(kill.uploads) == SLOW_UPLOADS
    assert "200" not in kill.uploads
    assert kill.problems(outcome["error"]) == []  # no more failures than that, and none elsewhere
    assert outcome["ok"] > 50
    assert kill.down_s < 5  # the balancer's health checks took it out
    assert kill.alert_instances == [instance]  # CNNServiceDown's expression named it, and only it
    assert kill.whole
    assert fleet.instances()[slot] == instance  # back on its address
    assert requests_all_succeed(fleet.balancer.url, 10)


def test_dashboard_and_alert_sums_equal_the_replicas_own_counters(fleet, tmp_path):
    load = Load(fleet.balancer.url, tmp_path, "aggregation", USERS)
    try:
        time.sleep(5)
    finally:
        load.stop()
    report = fleet.aggregation()
    assert report.mismatches == []
    assert report.nonzero >= 20  # real traffic in the counters compared, not only zeros
    rules = fleet.prometheus.rules()
    assert rules and all(rule["health"] == "ok" for rule in rules), rules
