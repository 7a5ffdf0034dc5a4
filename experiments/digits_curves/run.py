"""Experiment 4: training curves (the paper's Figure 3 style) from experiment 1's runs.

Test error and training loss vs epoch for constant depth vs stochastic depth (linear decay, uniform),
mean ± std over seeds, read from `experiments/digits_depth/results/results.json` (which holds every
run's per-epoch curves, taken from the runs' `metrics.jsonl`). Nothing is trained here: run
experiment 1 first.

    python -m experiments.digits_curves.run

Smoke run (after `python -m experiments.digits_depth.run --quick`):

    python -m experiments.digits_curves.run --quick

Outputs in `experiments/digits_curves/results/`: `results.md` (final-epoch and best-epoch numbers),
`digits_curves.png`, `results.json` (the mean curves).

Note: the training loss is measured in train mode (with blocks dropped), as in the paper's Figure 3,
so stochastic depth's training loss is higher by construction; the test error is in eval mode.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import common
from experiments.common import stats
from experiments.digits_depth import run as digits_depth

NAME = "digits_curves"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def mean_curves(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per variant: epochs and mean/std of test error and training loss over the runs' curves.

    Curves are truncated to the shortest run of the variant (a run still in progress is shorter).
    """
    out = {}
    for variant, group in common.group_by_variant(runs).items():
        curves = [r["curves"] for r in group]
        entry: dict[str, list[float]] = {"num_runs": [len(curves)]}
        for x_key, y_key in (("epoch", "test_error"), ("train_epoch", "train_loss")):
            n = min(len(c[y_key]) for c in curves)
            ys = np.array([c[y_key][:n] for c in curves], dtype=float)
            entry[x_key] = list(curves[0][x_key][:n])
            entry[f"{y_key}_mean"] = ys.mean(0).tolist() if n else []
            entry[f"{y_key}_std"] = (ys.std(0, ddof=1) if len(curves) > 1 else 0 * ys[0]).tolist()
        out[variant] = entry
    return out


def final_gaps(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Per variant other than constant: the paired final test-error gap to constant
    (`stats.paired_diff_interval`: per-seed differences, t interval on n - 1 df)."""
    variants = [v for v in common.group_by_variant(runs) if v != "constant"]
    return {v: stats.paired_diff_interval(runs, "test_error", v, "constant") for v in variants}


def _gap_cell(variant: str, gaps: dict[str, Any] | None) -> str:
    if variant == "constant":
        return "—"
    g = (gaps or {}).get(variant)
    if g is None:
        return "n/a"
    return f"{100 * g['diff']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}] (n={g['n']})"


def results_table(
    curves: dict[str, dict[str, list[float]]], gaps: dict[str, Any] | None = None
) -> str:
    """One row per variant; `gaps`: `final_gaps` (the last column, "n/a" without)."""
    rows = []
    for variant, c in curves.items():
        if not c["test_error_mean"]:
            continue
        best = int(np.argmin(c["test_error_mean"]))
        rows.append(
            [
                variant,
                c["num_runs"][0],
                f"{100 * c['test_error_mean'][-1]:.2f} ± {100 * c['test_error_std'][-1]:.2f}",
                f"{100 * c['test_error_mean'][best]:.2f} (epoch {c['epoch'][best]:g})",
                f"{c['train_loss_mean'][-1]:.4f}" if c["train_loss_mean"] else "n/a",
                _gap_cell(variant, gaps),
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "runs",
            "final test error (%)",
            "best mean test error (%)",
            "final training loss (train mode)",
            "final test error gap to constant (pp) [95% paired t]",
        ],
        rows,
    )


def plot(path: pathlib.Path, curves: dict[str, dict[str, list[float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"constant": "tab:red", "linear": "tab:blue", "uniform": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, c in curves.items():
        color = colors.get(variant)
        for ax, x_key, y_key, scale in (
            (axes[0], "epoch", "test_error", 100.0),
            (axes[1], "train_epoch", "train_loss", 1.0),
        ):
            x = np.array(c[x_key])
            m = scale * np.array(c[f"{y_key}_mean"])
            s = scale * np.array(c[f"{y_key}_std"])
            ax.plot(x, m, "-", color=color, label=f"{variant} (n={c['num_runs'][0]})")
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.15)
    axes[0].set_ylabel("test error (%)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("training loss (train mode)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    common.save_figure(fig, path, title)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="read the --quick run of experiment 1")
    parser.add_argument("--source", default=None, help="experiment 1's results.json")
    parser.add_argument("--out", default=None, help="default experiments/digits_curves/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.source = args.source or "/tmp/sdjax_quick/digits_depth/results.json"
        args.out = args.out or "/tmp/sdjax_quick/digits_curves"
    args.source = args.source or str(digits_depth.RESULTS_DIR / "results.json")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    source = json.loads(pathlib.Path(args.source).read_text(encoding="utf-8"))
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    curves = mean_curves(source["runs"])
    gaps = final_gaps(source["runs"])
    src = source["args"]
    # The call that trained the runs (digits_depth's table may itself be regenerated from them).
    source_command = source.get("runs_provenance", source["provenance"])["command"]
    title = (
        f"ResNet-{src['depth']} on digits, {src['epochs']} epochs (mean ± std over seeds; "
        f"stochastic depth rate {src['rate']})"
    )
    prov = common.provenance()
    results = {
        "experiment": "4: training curves (paper Figure 3 style) from experiment 1",
        "source": args.source,
        "source_command": source_command,
        "curves": curves,
        "final_gaps": gaps,
        "provenance": prov,
    }
    plot(out_dir / f"{NAME}.png", curves, title)
    md = (
        f"# Experiment 4: training curves on digits\n\n{title}. From the runs of experiment 1 "
        f"(`{source_command}`). Training loss in train mode (blocks dropped), "
        "averaged per epoch; test error in eval mode. Gap to constant: **paired analysis** (the "
        "runs of one seed share initial weights and data order), the mean of the per-seed "
        "differences of the final test error with a 95% t interval on n - 1 df; all seeds "
        "reported, none excluded.\n\n"
        + results_table(curves, gaps)
        + f"\n![test error and training loss vs epoch]({NAME}.png)\n"
    )
    md = common.write_report(out_dir, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main()
