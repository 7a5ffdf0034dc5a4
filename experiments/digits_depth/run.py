"""Experiment 1: constant depth vs stochastic depth (linear decay, uniform) on digits, several seeds.

A deep CIFAR-style ResNet (default ResNet-110: 54 residual blocks, on the 8x8 scikit-learn digits)
trained with `configs/digits_sd.py` three ways, `--seeds` seeds each:

* constant: `final_drop_rate=0` (every block always on);
* linear: the paper's rule, block l of L dropped with probability `rate * l / L` (batch mode);
* uniform: every block dropped with probability `rate`.

Each run is `python -m sdjax.main --config=configs/digits_sd.py --workdir=... --config.model.name=...`
(the exact commands are in results.json); finished runs are reused, interrupted ones resume. Reports
test error (mean ± std over seeds), total training wall-clock time (`train_time_s`: compilation,
evaluation and checkpoints included) and the steady-state epoch time (median epoch after the first).
The runs of one seed share initial weights and data order whatever the variant, so each variant's
test-error gap to constant depth is paired: the mean of the per-seed differences with a 95% t
interval on n - 1 df.
Experiment 4 (`experiments/digits_curves/run.py`) draws the training curves from the same runs.

Full run (about 75-90 minutes on two otherwise idle CPU cores; ResNet-56 with `--depth 56`: ~45 min):

    python -m experiments.digits_depth.run --depth 110 --epochs 15 --seeds 5

Smoke run (ResNet-20, 2 epochs, 1 seed; ~3-5 minutes; writes to /tmp):

    python -m experiments.digits_depth.run --quick

The committed tables, regenerated from the runs in the committed `results.json` (nothing trained;
a run counts when its command is the planned one up to `--workdir`, the others are listed as
missing):

    python -m experiments.digits_depth.run --depth 32 --epochs 15 --seeds 5 --aggregate_only

Outputs in `experiments/digits_depth/results/`: `results.md`, `digits_depth.png`, `results.json` (per-run
results, per-epoch curves, commands, versions, machine). Run workdirs (checkpoints, TensorBoard) go
to `workdirs/digits_depth/` (git-ignored).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from experiments import common
from experiments.common import stats

NAME = "digits_depth"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
CONFIG = "configs/digits_sd.py"
VARIANTS = ("constant", "linear", "uniform")


def variant_overrides(variant: str, rate: float) -> dict[str, Any]:
    """Config overrides (dotted paths) of one variant; unknown variant -> ValueError."""
    if variant == "constant":
        return {"model.final_drop_rate": 0.0}
    if variant in ("linear", "uniform"):
        return {"model.final_drop_rate": rate, "model.drop_schedule": variant}
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def expected_depth(variant: str, rate: float, num_blocks: int) -> float:
    """Expected number of active residual blocks during training."""
    from sdjax import schedules

    if variant == "constant":
        return float(num_blocks)
    return float(sum(1.0 - r for r in schedules.get(variant)(num_blocks, rate)))


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups runs (dicts with `variant`, `test_error`, `train_time_s`, `epoch_time_s`) by variant.

    Returns one row per variant (in order of first appearance) with mean/std of the test error,
    the total training time and the steady epoch time, and the time relative to `constant` when
    that variant is present, and `gap`: the paired test-error difference to constant
    (`stats.paired_diff_interval`: per-seed differences, t interval on n - 1 df; None for
    constant itself or with fewer than 2 seeds having both).
    """
    groups = common.group_by_variant(runs)
    rows = []
    for variant, group in groups.items():
        epoch_times = [r["epoch_time_s"] for r in group if r.get("epoch_time_s") is not None]
        rows.append(
            {
                "variant": variant,
                "num_runs": len(group),
                "test_error": common.mean_std([r["test_error"] for r in group]),
                "test_error_min_max": (
                    min(r["test_error"] for r in group),
                    max(r["test_error"] for r in group),
                ),
                "train_time_s": common.mean_std([r["train_time_s"] for r in group]),
                "epoch_time_s": common.mean_std(epoch_times) if epoch_times else None,
            }
        )
    base = next((r for r in rows if r["variant"] == "constant"), None)
    for row in rows:
        row["time_vs_constant"] = (
            row["train_time_s"][0] / base["train_time_s"][0] if base is not None else None
        )
        row["gap"] = (
            stats.paired_diff_interval(runs, "test_error", row["variant"], "constant")
            if base is not None and row["variant"] != "constant"
            else None
        )
        row["epoch_time_vs_constant"] = (
            row["epoch_time_s"][0] / base["epoch_time_s"][0]
            if base is not None and base["epoch_time_s"] and row["epoch_time_s"]
            else None
        )
    return rows


def _pm(ms, scale=1.0, digits=2) -> str:
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def _gap_cell(row: dict[str, Any]) -> str:
    g = row.get("gap")
    if row["variant"] == "constant":
        return "—"
    if g is None:
        return "n/a"
    return f"{100 * g['diff']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}] (n={g['n']})"


def results_table(rows: Sequence[dict[str, Any]], depths: dict[str, float], num_blocks: int) -> str:
    """The markdown table of `aggregate`'s rows; `depths`: expected active blocks per variant."""
    body = []
    for r in rows:
        lo, hi = r["test_error_min_max"]
        body.append(
            [
                r["variant"],
                f"{depths[r['variant']]:.1f} / {num_blocks}",
                r["num_runs"],
                _pm(r["test_error"], 100),
                f"{100 * lo:.2f} – {100 * hi:.2f}",
                _pm(r["train_time_s"], 1, 0),
                _pm(r["epoch_time_s"], 1, 2) if r["epoch_time_s"] else "n/a",
                f"{r['epoch_time_vs_constant']:.2f}" if r["epoch_time_vs_constant"] else "n/a",
                _gap_cell(r),
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "expected active blocks",
            "seeds",
            "test error (%)",
            "min – max (%)",
            "train time (s)",
            "epoch time (s)",
            "epoch time / constant",
            "test error gap to constant (pp) [95% paired t]",
        ],
        body,
    )


def plot(path: pathlib.Path, runs: Sequence[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, scale, label in (
        (axes[0], "test_error", 100, "test error (%)"),
        (axes[1], "epoch_time_s", 1, "steady epoch time (s)"),
    ):
        for i, variant in enumerate(variants):
            vals = [
                r[key] * scale for r in runs if r["variant"] == variant and r.get(key) is not None
            ]
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, color="gray", s=14, zorder=3)
            mean, std = common.mean_std(vals)
            ax.errorbar([i], [mean], yerr=[std], fmt="o", color="tab:blue", capsize=6, ms=8)
        ax.set_xticks(range(len(variants)), variants)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("test error: seeds (gray), mean ± std")
    axes[1].set_title("time per epoch (after the first)")
    common.save_figure(fig, path, title)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 2 epochs, 1 seed, in /tmp")
    parser.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth 6n+2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--rate", type=float, default=0.5, help="final (linear) / uniform drop rate"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--workdir_root", default=None, help="default workdirs/digits_depth")
    parser.add_argument("--out", default=None, help="default experiments/digits_depth/results")
    parser.add_argument(
        "--aggregate_only",
        action="store_true",
        help="train nothing: the tables from the runs in the committed results.json",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.epochs, args.seeds = 20, 2, 1
        args.workdir_root = args.workdir_root or "/tmp/sdjax_quick/workdirs/digits_depth"
        args.out = args.out or "/tmp/sdjax_quick/digits_depth"
    args.workdir_root = args.workdir_root or str(common.REPO_ROOT / "workdirs" / NAME)
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    num_blocks = 3 * ((args.depth - 2) // 6)
    base = {
        "model.name": f"cifar_resnet{args.depth}",
        "train.num_epochs": args.epochs,
        "train.eval_every_epochs": 1,
    }
    runs, missing = [], []
    committed, runs_prov = common.committed_runs(out_dir) if args.aggregate_only else ([], None)
    start = time.time()
    for seed in range(args.seeds):  # seed-major: partial results cover every variant early
        for variant in args.variants:
            workdir = (
                pathlib.Path(args.workdir_root)
                / f"depth{args.depth}_ep{args.epochs}"
                / (f"{variant}_seed{seed}")
            )
            overrides = {**base, **variant_overrides(variant, args.rate), "seed": seed}
            if args.aggregate_only:
                planned = common.train_command(CONFIG, workdir, overrides)
                run = common.find_run(committed, variant, seed, planned)
                if run is None:
                    missing.append({"variant": variant, "seed": seed})
                else:
                    runs.append(run)
                continue
            result = common.train_run(CONFIG, workdir, overrides)
            runs.append({"variant": variant, "seed": seed, **result})
            print(
                f"[{time.time() - start:7.0f} s] {variant:8s} seed {seed}: test error "
                f"{100 * result['test_error']:.2f}%, train time {result['train_time_s']:.0f} s"
                + (" (reused)" if result["reused"] else ""),
                flush=True,
            )

    rows = aggregate(runs)
    depths = {v: expected_depth(v, args.rate, num_blocks) for v in args.variants}
    prov = common.provenance()
    title = (
        f"ResNet-{args.depth} on digits, {args.epochs} epochs, {args.seeds} seeds "
        f"(stochastic depth rate {args.rate})"
    )
    results = {
        "experiment": "1: digits, constant vs stochastic depth",
        "args": vars(args),
        "config": CONFIG,
        "num_blocks": num_blocks,
        "expected_active_blocks": depths,
        "summary": rows,
        "runs": runs,
        "missing": missing,
        "provenance": prov,
    }
    if runs_prov is not None:  # the runs were read from the committed results.json
        results["runs_provenance"] = runs_prov
    plot(out_dir / f"{NAME}.png", runs, title)
    note = (
        f"- The runs were recorded by `{runs_prov['command']}` ({runs_prov['date_utc']}, git "
        f"commit `{runs_prov['git_commit']}`); this table is regenerated from them by the "
        "command above, nothing retrained\n"
        if runs_prov is not None
        else ""
    )
    md = common.write_report(
        out_dir,
        results,
        f"# Experiment 1: constant vs stochastic depth on digits\n\n{title}. Config "
        f"`{CONFIG}` (SGD, Nesterov, step schedule, batch mode, `scale_by_keep=False`); test set: "
        "the fixed 360-image digits split. Test error after the last epoch, mean ± std over seeds. "
        "Gap to constant: **paired analysis** (the runs of one seed share initial weights and "
        "data order), the mean of the per-seed differences with a 95% t interval on n - 1 df; "
        "all seeds reported, none excluded. "
        "Train time = the trainer's `train_time_s` (compilation, per-epoch evaluation and checkpoints "
        "included); epoch time = median epoch time after the first epoch.\n\n"
        + results_table(rows, depths, num_blocks)
        + f"\n![test error and epoch time]({NAME}.png)\n\n"
        "Per-run commands are in `results.json` (`runs[*].command`); curves: "
        "`experiments/digits_curves/run.py`.\n"
        + (
            "\n## Missing runs (no committed record with the planned command)\n\n"
            + "".join(f"- {m['variant']}, seed {m['seed']}\n" for m in missing)
            if missing
            else ""
        ),
        note,
    )
    print(md)
    return results


if __name__ == "__main__":
    main()
