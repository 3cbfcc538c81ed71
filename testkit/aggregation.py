"""Do the dashboard's and the alerts' queries add up every replica? Checked against the replicas'
own /metrics.

Every `sum [by (labels)] (rate(metric{matchers}[window]))` inside a dashboard panel or an alert
rule is what makes a fleet's figure out of its replicas'. With the load stopped, the same sum of
the counters themselves (`sum by (labels) (metric{matchers})`, asked of Prometheus) must equal the
sum, group by group, of the counters each replica serves on its own /metrics: a query that drops
a replica (a stray instance matcher, a job label that does not match the scrape job), or a scrape
that misses one, shows as a difference. Queries that keep replicas apart on purpose
(`max by (instance)`) must give one series per replica; the rest must give series without an
`instance` label, i.e. aggregated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import yaml
from prometheus_client.parser import text_string_to_metric_families

from testkit.prometheus import JOB
from testkit.server import ROOT

OPS = ROOT / "ops"
SUM_OF_RATE = re.compile(
    r"sum(?:\s+by\s*\(([^)]*)\))?\s*\(\s*rate\(\s*(\w+)\{([^}]*)\}\[[^\]]+\]\s*\)\s*\)")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((OPS / "grafana" / "dashboards" / "cnn-service.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> dict[str, str]:
    groups = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


@dataclass(frozen=True)
class CounterSum:
    """One `sum by (labels) (rate(metric{matchers}[w]))` found in a query."""

    by: tuple[str, ...]
    metric: str
    matchers: str

    def instant(self) -> str:
        return f"sum by ({', '.join(self.by)}) ({self.metric}{{{self.matchers}}})"

    def selects(self, labels: dict[str, str]) -> bool:
        for name, op, value in MATCHER.findall(self.matchers):
            actual = labels.get(name, "")
            matched = re.fullmatch(value, actual) is not None if op in ("=~", "!~") else actual == value
            if matched != (op in ("=", "=~")):
                return False
        return True


def counter_sums(expressions: list[str]) -> list[CounterSum]:
    found = {CounterSum(tuple(s.strip() for s in (by or "").split(",") if s.strip()), metric, matchers)
             for expr in expressions for by, metric, matchers in SUM_OF_RATE.findall(expr)}
    return sorted(found, key=lambda s: (s.metric, s.by, s.matchers))


def replica_samples(metrics_text: str, instance: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample a replica serves, with the labels Prometheus adds."""
    return [(sample.name, {**sample.labels, "job": JOB, "instance": instance}, sample.value)
            for family in text_string_to_metric_families(metrics_text) for sample in family.samples]


def expected_sum(total: CounterSum, samples: list[tuple[str, dict[str, str], float]]) -> dict[tuple, float]:
    groups: dict[tuple, float] = {}
    for name, labels, value in samples:
        if name == total.metric and total.selects(labels):
            key = tuple(labels.get(label, "") for label in total.by)
            groups[key] = groups.get(key, 0.0) + value
    return groups


@dataclass
class AggregationReport:
    compared: int = 0  # groups compared, over all the sums
    nonzero: int = 0  # of which carried traffic
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_aggregation(prometheus, replica_metrics: dict[str, str]) -> AggregationReport:
    """Compare every counter sum of the dashboard and the alerts, as Prometheus computes it, with the
    sum of the replicas' own counters. `replica_metrics`: {instance "127.0.0.1:port": /metrics text},
    fetched with the load stopped and scraped by Prometheus since."""
    report = AggregationReport()
    samples = [s for instance, text in replica_metrics.items() for s in replica_samples(text, instance)]
    expressions = dashboard_expressions() + list(alert_expressions().values())
    for total in counter_sums(expressions):
        expected = expected_sum(total, samples)
        seen = {tuple(r["metric"].get(label, "") for label in total.by): float(r["value"][1])
                for r in prometheus.query(total.instant())}
        for key in sorted(set(expected) | set(seen)):
            want, got = expected.get(key), seen.get(key)
            report.compared += 1
            report.nonzero += bool(want)
            if want is None or got is None or abs(want - got) > 1e-6 * max(1.0, abs(want)):
                report.mismatches.append(f"{total.instant()} {dict(zip(total.by, key))}: replicas {want}, "
                                         f"prometheus {got}")
    instances = set(replica_metrics)
    for expr in expressions:
        result = prometheus.query(expr.replace("$__rate_interval", "1m"))
        per_instance = re.search(r"by \([^)]*\binstance\b", expr) is not None
        labelled = {r["metric"].get("instance") for r in result}
        # a comparison (an alert's threshold) may leave out instances; a plain panel has them all
        complete = labelled == instances if re.search(r"[<>]|==", expr) is None else labelled <= instances
        if per_instance and not complete:
            report.mismatches.append(f"{expr}: instances {sorted(map(str, labelled))}, want {sorted(instances)}")
        if not per_instance and labelled - {None}:
            report.mismatches.append(f"{expr}: not aggregated over replicas ({sorted(map(str, labelled))})")
    return report
