"""Moved to `experiments.common.stats`; kept only for `experiments/fullscale/run.py` (another
engineer's, not yet switched). Delete once nothing imports `experiments.fidelity_stats`."""

from experiments.common.stats import mean_ci, welch_diff_interval  # noqa: F401
