"""Experiment 2: real CIFAR-10, short schedule: constant depth vs stochastic depth (batch mode).

A CIFAR ResNet (default ResNet-20) trained on the real CIFAR-10 (tfds, `../shared/data/tfds`) with
`configs/cifar10_sd.py:recipe=sdjax` -- sdjax's earlier recipe, with which the committed runs were
made (SGD lr 0.1, Nesterov momentum 0.9, weight decay 1e-4, step decay /10 at 50% and 75% of the
run, batch 128, 50k training images, per-channel normalisation, pad-4 crops and flips; the config
now defaults to the paper's recipe) -- shortened to `--epochs`
epochs, twice: constant depth (`final_drop_rate=0`) and stochastic depth (linear decay to `--rate`,
batch mode: a dropped block is skipped for the whole batch, forward and backward). Reports test
accuracy after the last epoch, the steady epoch time (median after the first epoch), the total
training time (`train_time_s`: compilation, evaluation and checkpoints included) and the time saved
by both measures. The two runs of a seed share initial weights and data order (paired): the
test-error gap is the per-seed difference, with a t interval on n - 1 df from 2 seeds on.

The paper (ResNet-110, 500 epochs): test error 6.41% -> 5.25%, training time -25%. A short schedule
on two CPU cores cannot reach those errors; it shows the speed-up and the early-training behaviour.

Default run (ResNet-20, 2 epochs per variant, 1 seed; about 30-40 minutes on two otherwise idle CPU
cores, scale with `--epochs`):

    python -m experiments.cifar10_short.run --epochs 2

The committed results (12 epochs per variant, data-parallel over two CPU devices: 77 minutes on
two otherwise idle cores):

    python -m experiments.cifar10_short.run --depth 20 --epochs 12 --cpu_devices 2

Smoke run (40 steps per variant on a 2,560-image training slice; a few minutes; writes to /tmp):

    python -m experiments.cifar10_short.run --quick

The committed tables, regenerated from the runs in the committed `results.json` (nothing
trained; a run counts when its command is the planned one up to `--workdir`, a committed
`--config=configs/cifar10_sd.py` read as the sdjax recipe it then was; the others are listed as
missing):

    python -m experiments.cifar10_short.run --depth 20 --epochs 12 --cpu_devices 2 \
        --data_dir /work/shared/data/tfds --aggregate_only

Outputs in `experiments/cifar10_short/results/`: `results.md`, `cifar10_short.png`, `results.json`.
Workdirs in `workdirs/cifar10_short/` (git-ignored); finished runs are reused, interrupted ones
resume.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import time
from collections.abc import Sequence
from typing import Any

from experiments import common
from experiments.common import stats
from experiments.regime import run as regime

NAME = "cifar10_short"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# sdjax's earlier recipe, the committed runs' (the config now defaults to the paper's recipe; a
# committed command's `--config=configs/cifar10_sd.py` predates that change and is read as this,
# see `same_run`).
CONFIG = regime.CONFIG
DEFAULT_DATA_DIR = common.REPO_ROOT.parent / "shared" / "data" / "tfds"
PAPER = {"constant": 0.0641, "stochastic depth": 0.0525, "time_saved": 0.25}


def variants(rate: float) -> dict[str, dict[str, Any]]:
    """Variant name -> config overrides (dotted paths)."""
    return {
        "constant": {"model.final_drop_rate": 0.0},
        "stochastic depth": {
            "model.final_drop_rate": rate,
            "model.drop_schedule": "linear",
            "model.drop_mode": "batch",
        },
    }


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: mean test accuracy, steady epoch time, total time; time saved vs constant.

    `runs`: dicts with `variant`, `seed`, `test_accuracy`, `epoch_time_s` (steady, may be None)
    and `train_time_s`. `time_saved` is `1 - epoch_time / constant's epoch_time` (the steady
    state: median epoch, first excluded; None without a constant run or epoch times);
    `total_time_saved` the same from `train_time_s` (first epochs, compilation and evaluation
    included). `error_gap` is the paired test-error difference to constant (`error_gap`).
    """
    groups = common.group_by_variant(runs)
    rows = []
    for variant, group in groups.items():
        ep = [r["epoch_time_s"] for r in group if r.get("epoch_time_s") is not None]
        rows.append(
            {
                "variant": variant,
                "num_runs": len(group),
                "test_accuracy": common.mean_std([r["test_accuracy"] for r in group]),
                "epoch_time_s": common.mean_std(ep)[0] if ep else None,
                "train_time_s": common.mean_std([r["train_time_s"] for r in group])[0],
                "error_gap": None,
            }
        )
    base = next((r for r in rows if r["variant"] == "constant"), None)
    for row in rows:
        ok = base is not None and base["epoch_time_s"] and row["epoch_time_s"]
        row["time_saved"] = 1.0 - row["epoch_time_s"] / base["epoch_time_s"] if ok else None
        row["total_time_saved"] = (
            1.0 - row["train_time_s"] / base["train_time_s"] if base is not None else None
        )
        if base is not None and row["variant"] != "constant":
            row["error_gap"] = error_gap(runs, row["variant"])
    return rows


def error_gap(runs: Sequence[dict[str, Any]], variant: str) -> dict[str, Any] | None:
    """Paired test-error difference `variant - constant` over the seeds that have both: the
    per-seed `differences`, their mean `diff`, and the t interval on n - 1 df (`low`/`high`
    None with one seed). None when no seed has both."""
    errs = [{**r, "error": 1.0 - r["test_accuracy"]} for r in runs]
    diffs = stats.paired_differences(errs, "error", variant, "constant")
    if not diffs:
        return None
    ci = stats.paired_diff_interval(errs, "error", variant, "constant")
    return {
        "n": len(diffs),
        "diff": sum(diffs) / len(diffs),
        "low": ci["low"] if ci else None,
        "high": ci["high"] if ci else None,
        "differences": diffs,
    }


def _gap_cell(gap: dict[str, Any] | None) -> str:
    if gap is None:
        return "—"
    text = f"{100 * gap['diff']:+.2f}"
    if gap["low"] is None:
        return text + f" (n={gap['n']}: no interval)"
    return text + f" [{100 * gap['low']:+.2f}, {100 * gap['high']:+.2f}] (n={gap['n']})"


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        acc, std = r["test_accuracy"]
        body.append(
            [
                r["variant"],
                r["num_runs"],
                f"{100 * acc:.2f}" + (f" ± {100 * std:.2f}" if r["num_runs"] > 1 else ""),
                f"{100 * (1 - acc):.2f}",
                f"{r['epoch_time_s']:.1f}" if r["epoch_time_s"] else "n/a",
                f"{r['train_time_s']:.0f}",
                f"{100 * r['time_saved']:.1f}%" if r["time_saved"] is not None else "n/a",
                f"{100 * r['total_time_saved']:.1f}%"
                if r["total_time_saved"] is not None
                else "n/a",
                _gap_cell(r.get("error_gap")),
                f"{100 * PAPER[r['variant']]:.2f}" if r["variant"] in PAPER else "",
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "runs",
            "test accuracy (%)",
            "test error (%)",
            "steady epoch time (s), median, first excluded",
            "total train time (s)",
            "time saved: steady epoch",
            "time saved: total",
            "test error gap to constant (pp), paired",
            "paper test error, 500 ep. ResNet-110 (%)",
        ],
        body,
    )


def plot(path: pathlib.Path, runs: Sequence[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {"constant": "tab:red", "stochastic depth": "tab:blue"}
    for r in runs:
        c = r["curves"]
        label = f"{r['variant']} (seed {r['seed']})"
        color = colors.get(r["variant"])
        axes[0].plot(c["epoch"], [100 * e for e in c["test_error"]], "o-", color=color, label=label)
        axes[1].plot(c["train_epoch"], c["train_loss"], "o-", color=color, label=label)
        axes[2].plot(
            range(1, len(c["epoch_time_s"]) + 1), c["epoch_time_s"], "o-", color=color, label=label
        )
    axes[0].set_ylabel("test error (%)")
    axes[1].set_ylabel("training loss (train mode, epoch mean)")
    axes[2].set_ylabel("epoch time (s); epoch 1 includes compilation")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, path, title)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 steps per variant, in /tmp")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth 6n+2")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant (the budget)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.5, help="final drop rate (linear decay)")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="tfds data directory")
    parser.add_argument("--workdir_root", default=None, help="default workdirs/cifar10_short")
    parser.add_argument("--out", default=None, help="default experiments/cifar10_short/results")
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=0,
        help="train.num_cpu_devices of the runs (0: JAX's default; 2 on a 2-core machine trains "
        "38-46%% faster, data-parallel)",
    )
    parser.add_argument(
        "--aggregate_only",
        action="store_true",
        help="train nothing: the tables from the runs in the committed results.json",
    )
    args = parser.parse_args(argv)
    args.train_split = "train"
    args.steps = -1
    if args.quick:
        args.epochs, args.seeds, args.steps = 2, 1, 40
        args.train_split = "train[:2560]"  # 20 steps per epoch at batch 128: 2 "epochs"
        args.workdir_root = args.workdir_root or "/tmp/sdjax_quick/workdirs/cifar10_short"
        args.out = args.out or "/tmp/sdjax_quick/cifar10_short"
    args.workdir_root = args.workdir_root or str(common.REPO_ROOT / "workdirs" / NAME)
    return args


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides (dotted paths) shared by every run of the plan."""
    return {
        "model.name": f"cifar_resnet{args.depth}",
        "input.data_dir": args.data_dir,
        "input.train_split": args.train_split,
        "train.num_epochs": args.epochs,
        "train.num_train_steps": args.steps,
        "train.eval_every_epochs": 1,
        "train.checkpoint_every_steps": 1000,
        "train.num_cpu_devices": args.cpu_devices,
    }


def same_run(command: str, planned: Sequence[str]) -> bool:
    """Whether a recorded run's command is `planned` up to `--workdir`; a recorded
    `--config=configs/cifar10_sd.py` (made before the paper's recipe became that config's
    default) reads as `CONFIG`, the sdjax recipe it ran (`regime.normalize_config`)."""

    def key(argv: Sequence[str]) -> list[str]:
        return [a for a in regime.normalize_config(argv) if not a.startswith("--workdir=")]

    return key(shlex.split(command)) == key(planned)


def committed_run(committed: Sequence[dict[str, Any]], variant: str, seed: int, planned):
    """The committed run of (variant, seed) made by the `planned` command, else None; its
    steady epoch time recomputed from its per-epoch times (`common.steady_epoch_time`)."""
    for run in committed:
        if (run["variant"], run["seed"]) == (variant, seed) and same_run(run["command"], planned):
            times = (run.get("curves") or {}).get("epoch_time_s") or []
            steady = common.steady_epoch_time(times) if times else run.get("epoch_time_s")
            return {**run, "epoch_time_s": steady}
    return None


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    base = base_overrides(args)
    runs, missing = [], []
    committed, runs_prov = [], None
    if args.aggregate_only and (out_dir / "results.json").exists():
        saved = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        committed = saved.get("runs", [])
        runs_prov = saved.get("runs_provenance", saved.get("provenance"))
    start = time.time()
    tag = f"depth{args.depth}_ep{args.epochs}" + ("_quick" if args.quick else "")
    for seed in range(args.seeds):
        for variant, overrides in variants(args.rate).items():
            workdir = (
                pathlib.Path(args.workdir_root) / tag / f"{variant.replace(' ', '_')}_seed{seed}"
            )
            if args.aggregate_only:
                planned = common.train_command(CONFIG, workdir, {**base, **overrides, "seed": seed})
                run = committed_run(committed, variant, seed, planned)
                if run is None:
                    missing.append(
                        {"variant": variant, "seed": seed, "command": shlex.join(planned)}
                    )
                else:
                    runs.append(run)
                continue
            result = common.train_run(CONFIG, workdir, {**base, **overrides, "seed": seed})
            runs.append({"variant": variant, "seed": seed, **result})
            print(
                f"[{time.time() - start:7.0f} s] {variant}, seed {seed}: test accuracy "
                f"{100 * result['test_accuracy']:.2f}%, train time {result['train_time_s']:.0f} s",
                flush=True,
            )

    rows = summarize(runs)
    prov = common.provenance()
    title = (
        f"CIFAR-10, ResNet-{args.depth}, {args.epochs} epochs"
        + (" (quick: 40 steps on a 2,560-image slice)" if args.quick else "")
        + f": constant vs stochastic depth (linear to {args.rate}, batch mode)"
    )
    results = {
        "experiment": "2: CIFAR-10 short schedule, constant vs stochastic depth",
        "args": vars(args),
        "config": CONFIG,
        "summary": rows,
        "runs": runs,
        "missing": missing,
        "paper": PAPER,
        "provenance": prov,
    }
    if runs_prov is not None:  # the runs were read from the committed results.json
        results["runs_provenance"] = runs_prov
    if runs:
        plot(out_dir / f"{NAME}.png", runs, title)
    miss = "".join(f"- {m['variant']}, seed {m['seed']}: `{m['command']}`\n" for m in missing)
    md = (
        f"# Experiment 2: CIFAR-10, short schedule\n\n{title}. Config `{CONFIG}` with the step "
        "schedule compressed to the run; test accuracy on the 10,000 test images after the last "
        "epoch. Time saved is given two ways: the steady state (median epoch time with the first "
        "epoch excluded, from the runs' per-epoch times) and the total (`train_time_s`: "
        "compilation, slow first epochs, evaluation and checkpoints included). Test-error gap: "
        "**paired analysis** (the runs of one seed share initial weights and data order): the "
        "mean of the per-seed differences, with a 95% t interval on n - 1 df when there are 2 or "
        "more seeds; with one seed it is a single difference without an interval. The paper's "
        "numbers (ResNet-110, 500 epochs, GPU) are given for reference only: this is a "
        "small-scale run.\n\n"
        + results_table(rows)
        + f"\n![curves]({NAME}.png)\n\nPer-run commands: `results.json` (`runs[*].command`).\n"
        + (
            "\n## Missing runs (no committed record with the planned command)\n\n" + miss
            if miss
            else ""
        )  # fmt: skip
    )
    note = (
        f"- The runs were recorded by `{runs_prov['command']}` ({runs_prov['date_utc']}, git "
        f"commit `{runs_prov['git_commit']}`, {runs_prov['machine']['cpu']}); this table is "
        "regenerated from them by the command above, nothing retrained\n"
        if runs_prov is not None
        else ""
    )
    md = common.write_report(out_dir, results, md, note)
    print(md)
    return results


if __name__ == "__main__":
    main()
