"""Confidence for a variant's mean score and for its difference from the baseline.

- Mean: Wilson's 95% score interval when every value is 0 or 1 (all built-in scorers), else a
  percentile bootstrap (2,000 resamples, seed 0).
- Paired difference (variant - baseline over the rows both scored): a percentile bootstrap of the mean
  per-row difference, resampling rows (2,000 resamples, seed 0). A fixed seed makes the intervals the
  same in every rerun over the same records.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 2000
SEED = 0


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denominator = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: list[float]) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of a mean (fixed seed)."""
    if not values:
        return (math.nan, math.nan)
    # Resampling n rows with replacement = drawing how often each distinct value is drawn (a multinomial),
    # so memory grows with the distinct values (three for a difference of 0/1 scores), not with the rows.
    distinct, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    n = len(values)
    rng = np.random.default_rng(SEED)
    chunk = max(1, min(RESAMPLES, 5_000_000 // len(distinct)))
    means = np.concatenate([rng.multinomial(n, counts / n, size=min(chunk, RESAMPLES - done)) @ distinct / n
                            for done in range(0, RESAMPLES, chunk)])
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def summarize(values: list[float]) -> dict[str, Any]:
    """mean, 95% interval and its method, and the count of scored rows."""
    n = len(values)
    binary = all(v in (0.0, 1.0) for v in values)
    low, high = wilson(sum(values), n) if binary else bootstrap_mean(values)
    return {"mean": _round(sum(values) / n if n else math.nan), "ci_low": _round(low), "ci_high": _round(high),
            "ci": "wilson" if binary else "bootstrap", "scored": n}


def paired_difference(values: dict[str, float], baseline: dict[str, float]) -> dict[str, Any]:
    """Mean of (value - baseline value) over the row keys both have, with its bootstrap 95% interval."""
    keys = sorted(values.keys() & baseline.keys())
    differences = [values[k] - baseline[k] for k in keys]
    low, high = bootstrap_mean(differences)
    mean = sum(differences) / len(differences) if differences else math.nan
    return {"diff": _round(mean), "diff_low": _round(low), "diff_high": _round(high), "pairs": len(keys)}


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)
