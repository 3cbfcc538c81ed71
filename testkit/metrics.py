"""A running server's Prometheus metrics, read with prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of `url`/metrics, keyed by (sample name, sorted label pairs)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_sum(samples: dict, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        value for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )
