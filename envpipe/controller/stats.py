"""Small statistics of the controller: paired savings with a 95 % interval. Plain Python (no numpy, no
scipy); the monotone fit that repairs a noisy profile is :mod:`envpipe.profile_fit`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95 % Student t quantiles t(0.975, df) for df = 1..30 (standard tables, e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, 1.3.6.7.2); beyond 30 the normal quantile 1.96 is within 4 %.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided 95 % interval, and how the interval was computed."""

    median: float
    low: float | None
    high: float | None
    n: int
    method: str

    @property
    def contains_zero(self) -> bool:
        """True when the interval cannot tell the value from 0 (also with too few samples for one)."""
        return self.low is None or self.high is None or self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "median": self.median,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "method": self.method,
            "contains_zero": self.contains_zero,
        }


def median_interval(values: Sequence[float]) -> Interval:
    """The median of ``values`` with a 95 % interval.

    With 6 or more values the interval is distribution-free: the order statistics ``(k, n+1-k)`` with the
    largest k whose binomial coverage is at least 95 %. With 2-5 values no such interval exists, and the
    Student t interval of the mean is given instead (it assumes roughly normal rounds); with one value there
    is no interval. ``method`` says which.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    median = statistics.median(xs)
    if n == 1:
        return Interval(median, None, None, 1, "one round: no interval")
    if n >= 6:
        k = _order_statistic_rank(n)
        coverage = _coverage(n, k)
        return Interval(
            median,
            xs[k - 1],
            xs[n - k],
            n,
            f"order statistics {k} and {n + 1 - k} of {n} (distribution-free, {coverage:.1%})",
        )
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    half = _T975[n - 2] * sd / math.sqrt(n)
    return Interval(median, mean - half, mean + half, n, f"Student t interval of the mean over {n} rounds")


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n samples of a continuous distribution."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2**n
    return 1.0 - 2.0 * tail


def _order_statistic_rank(n: int) -> int:
    k = 1
    while k + 1 <= n // 2 and _coverage(n, k + 1) >= 0.95:
        k += 1
    return k
