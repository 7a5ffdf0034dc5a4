"""Pure statistics for the fidelity experiments: difference-of-means intervals and grouping.

No framework imports (numpy and scipy only), so that the aggregation is tested in milliseconds
(`tests/test_fidelity.py`) and works on partial results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "bootstrap_diff_interval",
    "cpu_isa",
    "group_runs",
    "mean_ci",
    "welch_diff_interval",
]

_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_isa() -> str:
    """The vector ISA flags of this CPU that matter for convolution speed (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in _ISA_FLAGS if x in flags) or "none of " + str(
                        _ISA_FLAGS
                    )
    except OSError:
        pass
    return "unknown"


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
    from scipy import stats

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
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
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
    """Mean, sample std and the half-width of the t interval of the mean (`nan` for n < 2)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("need at least one value")
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": float("nan"), "half_width": float("nan")}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half}


def group_runs(runs: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Groups run dicts by the tuple of their `keys` values, in order of first appearance."""
    out: dict[tuple, list[dict]] = {}
    for run in runs:
        out.setdefault(tuple(run[k] for k in keys), []).append(run)
    return out
