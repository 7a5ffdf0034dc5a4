"""Timing loops shared by the benchmarks: median wall time of repeated calls.

A timed callable takes no arguments and returns only once its work is done (wrap a JAX call in
`jax.block_until_ready`). Load from other processes on a shared machine is the main noise: where
several implementations are compared, `interleaved` times them in alternating rounds so that
load changes hit all of them alike, and every figure is a median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int) -> dict[str, float]:
    """Times one callable: its first call (compilation, for a jitted function), then `repeats`.

    Args:
      fn: the zero-argument callable; called ``1 + warmup + repeats`` times.
      repeats: timed calls (>= 1); warmup: untimed calls after the first.

    Returns:
      ``{"median_ms", "min_ms", "cpu_ms" (median process CPU time per call, all threads),
      "first_call_s", "repeats"}``.
    """
    start = time.perf_counter()
    fn()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {
        "median_ms": 1e3 * statistics.median(walls),
        "min_ms": 1e3 * min(walls),
        "cpu_ms": 1e3 * statistics.median(cpus),
        "first_call_s": first_s,
        "repeats": repeats,
    }


def interleaved(
    callables: dict[str, Callable[[], object]], *, rounds: int, per_round: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall ms of every call of each callable, timed in alternating rounds after a warm-up.

    Each callable is called `warmup` times untimed, then each round calls every callable
    `per_round` times in turn. Returns ``{name: [ms per timed call]}`` (``rounds * per_round``
    values each); take `statistics.median` of each for the figure.
    """
    for fn in callables.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in callables}
    for _ in range(rounds):
        for name, fn in callables.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times
