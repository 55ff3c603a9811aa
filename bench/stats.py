"""Numbers from samples: percentiles, units, and quantiles of Prometheus histograms (read
with reconciler.devstack.histogram). Pure arithmetic: no servers, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def mb(n_bytes: float) -> float:
    return n_bytes / (1024 * 1024)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile() over cumulative buckets (linear within a bucket)."""
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return buckets[-1][0]


def bucket_summary(buckets: Sequence[tuple[float, float]]) -> str:
    """'le=0.005:12 le=0.01:40 ...' for buckets whose count changed."""
    parts = []
    prev = 0.0
    for le, c in buckets:
        if c != prev:
            parts.append(f"<={'+Inf' if math.isinf(le) else f'{le:g}'}:{int(c)}")
        prev = c
    return " ".join(parts)
