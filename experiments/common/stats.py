"""The intervals every study uses: t interval of a mean (paired differences included), Welch.

* `mean_ci`: mean and the t interval of the mean (n - 1 df; `ci_bounds` gives its ends);
  applied to per-seed differences it is the paired t interval (`paired_differences` pairs runs
  by seed; `paired_diff_interval` gives it in the shape of `welch_diff_interval`'s result).
* `welch_diff_interval`: difference of two independent means, Welch-Satterthwaite df.
* `difference_of_differences`: the difference of two independent Welch estimates (each with its
  se and df), Satterthwaite df.
* `bootstrap_diff_interval`: percentile bootstrap of a difference of means.

No framework imports (numpy and scipy only), so that the aggregation is tested in milliseconds
and works on partial results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "bootstrap_diff_interval",
    "ci_bounds",
    "difference_of_differences",
    "group_runs",
    "mean_ci",
    "paired_diff_interval",
    "paired_differences",
    "t_half_width",
    "welch_diff_interval",
]


def t_half_width(se: float, df: float, confidence: float = 0.95) -> float:
    """Half-width of the two-sided t interval: ``t_{(1 + confidence) / 2, df} * se``."""
    from scipy import stats  # noqa: PLC0415 (scipy only where an interval is computed)

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(stats.t.ppf(0.5 + confidence / 2, df)) * se


def welch_diff_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Welch t interval for `mean(a) - mean(b)` (unequal variances, Welch-Satterthwaite df).

    Args:
      a, b: samples with at least 2 values each.
      confidence: two-sided coverage in (0, 1).

    Returns:
      `{"diff", "low", "high", "df", "se"}`. When both samples have zero variance, `se = 0`,
      `df = n_a + n_b - 2` and the interval is the point `diff`.

    Raises:
      ValueError: a sample has fewer than 2 values, or `confidence` is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need >= 2 values per sample, got {len(a)} and {len(b)}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {
            "diff": diff,
            "low": diff,
            "high": diff,
            "df": float(len(a) + len(b) - 2),
            "se": 0.0,
        }
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_half_width(se, df, confidence)
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": float(df), "se": se}


def bootstrap_diff_interval(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    num_resamples: int = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap interval for `mean(a) - mean(b)` (each sample resampled separately).

    Returns `{"diff", "low", "high"}`. Deterministic for a given `seed`.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 1 or len(b) < 1:
        raise ValueError(f"need >= 1 value per sample, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), (num_resamples, len(a)))].mean(1)
    mb = b[rng.integers(0, len(b), (num_resamples, len(b)))].mean(1)
    lo, hi = np.quantile(ma - mb, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return {"diff": float(a.mean() - b.mean()), "low": float(lo), "high": float(hi)}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and the half-width of the t interval of the mean, n - 1 df (`nan` for
    n < 2). Of per-seed differences (`paired_differences`), this is the paired t interval."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("need at least one value")
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": float("nan"), "half_width": float("nan")}
    std = float(v.std(ddof=1))
    half = t_half_width(std / math.sqrt(n), n - 1, confidence)
    return {"n": n, "mean": mean, "std": std, "half_width": half}


def ci_bounds(ci: dict[str, float]) -> tuple[float, float]:
    """``(mean - half_width, mean + half_width)`` of a `mean_ci` result (both `nan` for n = 1)."""
    return ci["mean"] - ci["half_width"], ci["mean"] + ci["half_width"]


def paired_differences(
    runs: Iterable[dict[str, Any]], key: str, first: str, second: str
) -> list[float]:
    """``run[key]`` of variant `first` minus that of `second`, per seed having both, by seed.

    Args:
      runs: dicts with ``variant``, ``seed`` and `key`.
      key: the compared value; first, second: the two variants.
    """
    by_seed: dict[Any, dict[str, float]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["variant"]] = float(run[key])
    return [v[first] - v[second] for _, v in sorted(by_seed.items()) if first in v and second in v]


def paired_diff_interval(
    runs: Iterable[dict[str, Any]],
    key: str,
    first: str,
    second: str,
    confidence: float = 0.95,
) -> dict[str, Any] | None:
    """Paired t interval of ``first - second`` over the seeds that have both (n - 1 df).

    `mean_ci(paired_differences(...))` in the shape of `welch_diff_interval`'s result, so that
    `difference_of_differences` takes it too.

    Returns:
      ``{"diff", "low", "high", "df", "se", "n", "differences"}`` (per-seed differences in seed
      order); None for fewer than 2 pairs.
    """
    diffs = paired_differences(runs, key, first, second)
    if len(diffs) < 2:
        return None
    ci = mean_ci(diffs, confidence)
    n = ci["n"]
    low, high = ci_bounds(ci)
    return {
        "diff": ci["mean"],
        "low": low,
        "high": high,
        "df": float(n - 1),
        "se": ci["std"] / math.sqrt(n),
        "n": n,
        "differences": diffs,
    }


def difference_of_differences(
    a: dict[str, float], b: dict[str, float], confidence: float = 0.95
) -> dict[str, float]:
    """``a["diff"] - b["diff"]`` for two independent `welch_diff_interval` results.

    ``se^2 = se_a^2 + se_b^2`` and ``df = se^4 / (se_a^4 / df_a + se_b^4 / df_b)``
    (Satterthwaite, from each estimate's own df), so that with few seeds the interval widens as
    the Welch intervals do. Returns ``{"diff", "low", "high", "se", "df"}``.
    """
    diff = a["diff"] - b["diff"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    if se == 0.0:
        return {"diff": diff, "low": diff, "high": diff, "se": 0.0, "df": a["df"] + b["df"]}
    df = se**4 / (a["se"] ** 4 / a["df"] + b["se"] ** 4 / b["df"])
    half = t_half_width(se, df, confidence)
    return {"diff": diff, "low": diff - half, "high": diff + half, "se": se, "df": df}


def group_runs(runs: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Groups run dicts by the tuple of their `keys` values, in order of first appearance."""
    out: dict[tuple, list[dict]] = {}
    for run in runs:
        out.setdefault(tuple(run[k] for k in keys), []).append(run)
    return out
