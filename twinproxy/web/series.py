"""A ring buffer of 1-second samples kept in the server, and the arithmetic of rates and percentiles.

Owns :class:`Series` (the last :data:`MAX_POINTS` points of ops/s and p99,
``GET /api/series``), :func:`rate` (a counter's change per second between
two samples, never negative: a restarted process's counters start again at
0) and :func:`bucket_percentile` (a percentile of the latency histogram's
bucket counts, interpolated inside its bucket), :func:`percentiles` (the
p50/p99 pair both pages show) and :func:`add_counts` (histograms summed
bucket by bucket).  Pure: no reactor, no I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from twinproxy.stats import LATENCY_BUCKETS

MAX_POINTS = 600


def rate(before: Optional[float], after: Optional[float], seconds: float) -> float:
    """Per-second change of a counter from ``before`` to ``after``; 0 when unknown, reset or no time passed."""
    if before is None or after is None or seconds <= 0 or after < before:
        return 0.0
    return (after - before) / seconds


def bucket_deltas(before: Optional[Sequence[int]], after: Sequence[int]) -> List[int]:
    """Observations per bucket between two cumulative histograms (``before`` None: since start).

    A bucket that went down (the process restarted) counts ``after`` alone.
    """
    if before is None or len(before) != len(after) or any(b > a for b, a in zip(before, after)):
        return list(after)
    return [a - b for b, a in zip(before, after)]


def per_bucket(cumulative: Sequence[int]) -> List[int]:
    """Prometheus-style cumulative bucket counts (the stats document's) as counts per bucket."""
    return [count - (cumulative[index - 1] if index else 0) for index, count in enumerate(cumulative)]


def bucket_percentile(counts: Sequence[int], quantile: float,
                      bounds: Sequence[float] = LATENCY_BUCKETS) -> Optional[float]:
    """The ``quantile`` (0..1) of a histogram, in seconds; None for an empty one.

    ``counts`` has one entry per bound plus the +Inf bucket.  Inside a
    bucket the observations are taken as spread evenly (Prometheus's
    ``histogram_quantile``); the +Inf bucket answers its lower bound.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = bounds[index - 1] if index > 0 else 0.0
            if index >= len(bounds):
                return lower
            upper = bounds[index]
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return bounds[-1]


def milliseconds(seconds: Optional[float]) -> Optional[float]:
    """Seconds as milliseconds rounded to 3 decimals (None stays None)."""
    return None if seconds is None else round(seconds * 1000.0, 3)


def add_counts(total: Optional[Sequence[int]], counts: Sequence[int]) -> List[int]:
    """Two bucket histograms summed element-wise (``total`` None or of another length: ``counts`` alone)."""
    if not total or len(total) != len(counts):
        return list(counts)
    return [a + b for a, b in zip(total, counts)]


def percentiles(counts: Optional[Sequence[int]]) -> Tuple[Optional[float], Optional[float]]:
    """(p50, p99) in milliseconds of a per-bucket histogram; (None, None) when there is nothing in it."""
    if not counts:
        return None, None
    return milliseconds(bucket_percentile(counts, 0.5)), milliseconds(bucket_percentile(counts, 0.99))


class Series:
    """The last ``limit`` samples of ops/s and p99 (milliseconds), one point per sample, oldest first."""

    def __init__(self, limit: int = MAX_POINTS) -> None:
        self._points: Deque[Dict[str, Any]] = deque(maxlen=limit)

    def add(self, now: float, ops_per_second: float, p99_ms: Optional[float]) -> None:
        self._points.append({"t": round(now, 3), "ops_per_second": round(ops_per_second, 1), "p99_ms": p99_ms})

    def last(self) -> Optional[Dict[str, Any]]:
        return self._points[-1] if self._points else None

    def document(self, now: float, seconds: float, period: float) -> Dict[str, Any]:
        """``GET /api/series``: the points of the last ``seconds`` (at most the buffer)."""
        since = now - max(0.0, seconds)
        return {"period": period, "points": [p for p in self._points if p["t"] > since]}
