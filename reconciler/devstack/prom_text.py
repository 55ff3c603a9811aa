"""Reading a /metrics scrape: a sample's value by name and labels, a histogram's buckets.

Built on ``prometheus_client.parser``, so it reads exactly what Prometheus would.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class HistogramValues:
    buckets: list[tuple[float, float]]  # cumulative (le, count), ascending le, +Inf last
    count: float
    sum: float


def _samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _matches(sample: Sample, name: str, labels: dict[str, str]) -> bool:
    return sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` (e.g. ``x_total``, ``x_count``) whose labels
    include ``labels``; 0 when there is none."""
    return float(sum(s.value for s in _samples(text) if _matches(s, name, labels)))


def histogram(text: str, name: str, **labels: str) -> HistogramValues:
    """Histogram ``name``'s cumulative buckets, count and sum, summed over the label sets
    that include ``labels`` (PromQL's ``sum by (le)``)."""
    buckets: dict[float, float] = defaultdict(float)
    count = total = 0.0
    for s in _samples(text):
        if _matches(s, f"{name}_bucket", labels):
            le = s.labels["le"]
            buckets[math.inf if le == "+Inf" else float(le)] += s.value
        elif _matches(s, f"{name}_count", labels):
            count += s.value
        elif _matches(s, f"{name}_sum", labels):
            total += s.value
    return HistogramValues(sorted(buckets.items()), count, total)
