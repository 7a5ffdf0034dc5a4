"""Tables and figures of the regime study (`experiments.regime.run`) from its run records.

A run record is a dict with at least `budget` (epochs), `variant`, `seed`, `test_error` and
`final_train_loss` (may be `None`). Variants are named as `experiments.regime.run.parse_variant` reads
them: `constant`, `sd` (linear to `--rate`), `warmup<F>` (`sd` with the drop rates ramped up over
the first fraction F of the steps), `linear<R>` / `uniform<R>` (the survival sweep: final drop rate
R with the paper's linear rule or the same rate in every block; the sweep and its grouping are
defined once, in `experiments.regime.survival_sweep`).

Two views:
* the budget view (constant, `sd`, `warmup*` per budget): test error, final train loss and the
  variant-minus-constant gap with a 95% paired t interval; figure: test error vs budget;
* the survival sweep (paper Figure 8) at each budget that has `linear*` / `uniform*` runs: test
  error vs final drop rate p_L, p_L = 0 being constant depth and `sd` the linear rule at `--rate`.

The design is paired: the runs of one seed share their initial weights and data order whatever
the variant, so every gap is the mean of the per-seed differences (variant minus constant, seeds
that have both) with a t interval on n - 1 df (`stats.paired_diff_interval`), not an unpaired
Welch interval. Everything works on partial results: a variant with one run has no interval
(`n/a`), a gap needs >= 2 seeds with both runs.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from experiments import common
from experiments.common import stats
from experiments.regime import survival_sweep

SWEEP_RULES = survival_sweep.RULES


def variant_order(variant: str) -> tuple[int, str]:
    """Sort key: constant, sd, warmup*, then the sweep variants by rule and rate."""
    for rank, prefix in enumerate(("constant", "sd", "warmup", "linear", "uniform")):
        if variant.startswith(prefix):
            return rank, variant
    return 5, variant


def is_sweep(variant: str) -> bool:
    return survival_sweep.parse_variant(variant) is not None


def label(variant: str, rate: float) -> str:
    """Human-readable name of a variant (rate = the study's `--rate`)."""
    if variant == "constant":
        return "constant depth"
    if variant == "sd":
        return f"stochastic depth (linear to {rate})"
    if variant.startswith("warmup"):
        return f"SD, linear to {rate}, rates ramped up over the first {variant[6:]} of the steps"
    rule, value = survival_sweep.parse_variant(variant)
    return f"SD, {rule} rule, p_L = {value:g}"


def summarize(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per (budget, variant): error mean/interval, mean final train loss, gap to constant.

    Rows are sorted by budget, then `variant_order`. `gap` is the paired t interval of
    variant-minus-constant test error at the same budget over the seeds that have both
    (`stats.paired_diff_interval`; `None` for constant itself or with < 2 such seeds).
    """
    groups = stats.group_runs(runs, ("budget", "variant"))
    rows = []
    for budget, variant in sorted(groups, key=lambda k: (k[0], variant_order(k[1]))):
        group = groups[(budget, variant)]
        errs = [r["test_error"] for r in group]
        losses = [r["final_train_loss"] for r in group if r.get("final_train_loss") is not None]
        base = groups.get((budget, "constant"), [])
        gap = None
        if variant != "constant":
            gap = stats.paired_diff_interval(
                [*group, *base], "test_error", variant, "constant", confidence
            )
        rows.append(
            {
                "budget": budget,
                "variant": variant,
                "error": stats.mean_ci(errs, confidence),
                "train_loss": sum(losses) / len(losses) if losses else None,
                "seeds": sorted(r["seed"] for r in group),
                "gap": gap,
            }
        )
    return rows


def _error_cell(m: dict[str, Any] | None) -> str:
    return (
        "n/a"
        if m is None
        else f"{common.pct(m['mean'])} ± {common.pct(m['half_width'])} (n={m['n']})"
    )


def _gap_cell(g: dict[str, Any] | None) -> str:
    return (
        "n/a"
        if g is None
        else f"{common.pct(g['diff'])} [{common.pct(g['low'])}, {common.pct(g['high'])}]"
    )


def budget_table(rows: Sequence[dict[str, Any]], rate: float) -> str:
    """The budget view: every non-sweep (budget, variant) row."""
    body = [
        [
            r["budget"],
            label(r["variant"], rate),
            _error_cell(r["error"]),
            "n/a" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
            "—" if r["variant"] == "constant" else _gap_cell(r["gap"]),
        ]
        for r in rows
        if not is_sweep(r["variant"])
    ]
    return common.markdown_table(
        [
            "budget (epochs)",
            "variant",
            "test error (%) mean ± 95% t",
            "final train loss",
            "gap to constant (pp) [95% paired t]",
        ],
        body,
    )


def sweep_points(rows: Sequence[dict[str, Any]], budget: int, rate: float) -> dict[str, list]:
    """Per rule, the (p_L, row) points of the survival sweep at `budget`, sorted by p_L.

    p_L = 0 is the constant row (shared by both rules); `sd` is the linear rule at `rate`.
    """
    at = {r["variant"]: r for r in rows if r["budget"] == budget}
    points = [(None, 0.0, at["constant"])] if "constant" in at else []
    if "sd" in at:
        points.append(("linear", rate, at["sd"]))
    for variant, row in at.items():
        parsed = survival_sweep.parse_variant(variant)
        if parsed is not None:
            points.append((*parsed, row))
    return survival_sweep.by_rule(points)


def sweep_budgets(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Budgets that have at least one survival-sweep run."""
    return sorted({r["budget"] for r in rows if is_sweep(r["variant"])})


def sweep_table(rows: Sequence[dict[str, Any]], budget: int, rate: float) -> str:
    points = sweep_points(rows, budget, rate)
    by_rate: dict[float, dict[str, dict]] = {}
    for rule, pts in points.items():
        for p, row in pts:
            by_rate.setdefault(p, {})[rule] = row
    body = []
    for p in sorted(by_rate):
        cells: list[Any] = [f"{p:g}"]
        for rule in SWEEP_RULES:
            row = by_rate[p].get(rule)
            cells.append(_error_cell(row and row["error"]))
            cells.append("—" if p == 0 else _gap_cell(row and row["gap"]))
        body.append(cells)
    return common.markdown_table(
        [
            "p_L (final drop rate)",
            "linear: test error (%)",
            "linear: gap to constant (pp)",
            "uniform: test error (%)",
            "uniform: gap to constant (pp)",
        ],
        body,
    )


def _errorbar(ax, xs, rows, **kwargs) -> None:
    ys = [100 * r["error"]["mean"] for r in rows]
    es = [100 * r["error"]["half_width"] if r["error"]["n"] > 1 else 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=4, **kwargs)


def plot_budgets(path: pathlib.Path, runs, rows, rate: float, title: str) -> None:
    """Test error vs budget per non-sweep variant: seeds as dots, means with 95% t intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in rows if not is_sweep(r["variant"])}, key=variant_order)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for i, variant in enumerate(variants):
        color = f"C{i}"
        shift = 1 + (i - (len(variants) - 1) / 2) * 0.03
        pts = [(r["budget"], r["test_error"]) for r in runs if r["variant"] == variant]
        ax.scatter([b * shift for b, _ in pts], [100 * e for _, e in pts], s=10, color=color,
                   alpha=0.4)  # fmt: skip
        mine = [r for r in rows if r["variant"] == variant]
        _errorbar(ax, [r["budget"] * shift for r in mine], mine, color=color,
                  label=label(variant, rate))  # fmt: skip
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training budget (epochs, step schedule compressed to the budget)")
    ax.set_ylabel("test error (%), 10,000 CIFAR-10 test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path, title)


def plot_sweep(path: pathlib.Path, rows, budget: int, rate: float, title: str) -> None:
    """Survival sweep at one budget: test error vs p_L, linear vs uniform rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (rule, pts) in enumerate(sweep_points(rows, budget, rate).items()):
        if pts:
            _errorbar(ax, [p + (i - 0.5) * 0.01 for p, _ in pts], [r for _, r in pts],
                      color=f"C{i}", label=f"{rule} rule")  # fmt: skip
    ax.set_xlabel("p_L: drop rate of the last block (0 = constant depth)")
    ax.set_ylabel("test error (%), 10,000 CIFAR-10 test images")
    ax.grid(alpha=0.3)
    ax.legend()
    common.save_figure(fig, path, title)
