"""Bootstrap confidence intervals: a system's mean score, and the paired difference between two systems.

Percentile bootstrap over items with a fixed seed, so a report is reproducible. The paired version resamples items
(the same resampled items for both systems), which is what makes a small difference on a shared item set
detectable. Pure numbers: never reads files, never imports a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean with its (1 - alpha) percentile-bootstrap interval over ``n`` items."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over items both systems scored, its interval, and the bootstrap share of resamples with a
    difference <= 0 (a one-sided p-value for "a beats b")."""

    mean: float
    low: float
    high: float
    n: int
    p_not_better: float


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, alpha: float = 0.05,
                   seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile-bootstrap interval. Raises ValueError on an empty list."""
    import numpy as np

    if not values:
        raise ValueError("bootstrap_mean needs at least one value")
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(data.mean()), float(low), float(high), len(data))


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, alpha: float = 0.05,
                      seed: int = 0) -> PairedDifference:
    """Paired bootstrap of mean(a - b); ``a`` and ``b`` are scores of the same items, in the same order."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired_difference needs at least one item")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(diff), float((means <= 0).mean()))
