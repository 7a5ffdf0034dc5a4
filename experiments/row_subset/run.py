"""Row-subset vs masked row stochastic depth on digits: test error at the same rates, 5 seeds.

`configs/digits_row_subset.py` (ResNet-32, drop rate linear to 0.5, ``scale_by_keep=True``)
trained two ways, ``--seeds`` seeds each, everything else equal:

* ``row``: masked row mode (``drop_mode="row"``): one Bernoulli(1 - rate) gate per sample, every
  branch computed and multiplied by its gate;
* ``row_subset``: ``drop_mode="row_subset"``: per block exactly ``k = max(1, round((1 - rate) *
  64))`` random samples run the branch (a BatchNorm in the branch normalises over them), the
  others are not computed.

A seed fixes the initialization, the data order and the drop key of both variants, so the runs
are paired by seed: the report gives each variant's test error (mean ± std) and the paired
difference ``row_subset - row`` with its 95% t-interval (``n - 1`` degrees of freedom). Epoch
times are reported too (median epoch after the first), but the training runs are not a
benchmark (see `experiments/benchmark/benchmark.py`).

Each run is ``python -m sdjax.main --config=configs/digits_row_subset.py --workdir=...
--config.model.drop_mode=...`` (exact commands in results.json); finished runs are reused,
interrupted ones resume. The command this folder's results come from::

    python -m experiments.row_subset.run --seeds 5 --epochs 15

The committed tables, regenerated from the runs in the committed ``results.json`` (nothing
trained; a run counts when its command is the planned one up to ``--workdir``; the call that
recorded the runs is kept as ``runs_provenance``)::

    python -m experiments.row_subset.run --seeds 5 --epochs 15 --aggregate_only

Smoke run (ResNet-20, 2 epochs, 1 seed, writes to /tmp)::

    python -m experiments.row_subset.run --quick

Outputs in ``experiments/row_subset/results/digits/``: ``results.md`` and ``results.json``
(per-run results, commands, versions, machine). Run workdirs go to
``workdirs/row_subset_digits/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from experiments import common
from experiments.common import stats

NAME = "row_subset_digits"
CONFIG = "configs/digits_row_subset.py"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "digits"
VARIANTS = ("row", "row_subset")


def variant_overrides(variant: str) -> dict[str, Any]:
    """Config overrides (dotted paths) of one variant; an unknown variant -> ValueError."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return {"model.drop_mode": variant}


def paired_difference(
    runs: Sequence[dict[str, Any]], key: str = "test_error", first: str = "row_subset"
) -> dict[str, Any] | None:
    """Mean and 95% paired t-interval half-width of ``run[first][key] - run[other][key]``.

    Args:
      runs: dicts with ``variant``, ``seed`` and ``key``; seeds present for both variants pair.
      key: the compared value.
      first: the variant whose value comes first in the difference (the other is ``row``).

    Returns:
      ``{"n", "mean", "half_width_95", "differences"}``, ``half_width_95`` None for one pair;
      None when no seed has both variants.
    """
    other = next(v for v in VARIANTS if v != first)
    diffs = stats.paired_differences(runs, key, first, other)
    if not diffs:
        return None
    ci = stats.mean_ci(diffs)
    half = ci["half_width"] if ci["n"] > 1 else None
    return {"n": ci["n"], "mean": ci["mean"], "half_width_95": half, "differences": diffs}


def results_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per variant: seeds, test error mean ± std and range, steady epoch time."""
    body = []
    for variant, group in common.group_by_variant(runs).items():
        errors = [r["test_error"] for r in group]
        epochs = [r["epoch_time_s"] for r in group if r.get("epoch_time_s") is not None]
        body.append(
            [
                variant,
                len(group),
                common.format_mean_std(errors, scale=100),
                f"{100 * min(errors):.2f} – {100 * max(errors):.2f}",
                common.format_mean_std(epochs, digits=2) if epochs else "n/a",
            ]
        )
    headers = ["variant", "seeds", "test error (%)", "min – max (%)", "epoch time (s)"]
    return common.markdown_table(headers, body)


def difference_text(diff: dict[str, Any] | None) -> str:
    """The paired difference as a sentence (percentage points)."""
    if diff is None:
        return "No seed has finished both variants yet."
    text = f"Paired difference row_subset - row over {diff['n']} seeds: {100 * diff['mean']:+.2f}"
    if diff["half_width_95"] is None:
        return text + " percentage points (one pair: no interval)."
    low = 100 * (diff["mean"] - diff["half_width_95"])
    high = 100 * (diff["mean"] + diff["half_width_95"])
    verdict = "contains" if low <= 0 <= high else "excludes"
    return (
        f"{text} ± {100 * diff['half_width_95']:.2f} percentage points (95% t-interval "
        f"[{low:+.2f}, {high:+.2f}], which {verdict} 0); per seed: "
        + ", ".join(f"{100 * d:+.2f}" for d in diff["differences"])
        + "."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 2 epochs, 1 seed, in /tmp")
    parser.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth 6n+2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir_root", default=None, help=f"default workdirs/{NAME}")
    parser.add_argument("--out", default=None, help="default experiments/row_subset/results/digits")
    parser.add_argument(
        "--aggregate_only",
        action="store_true",
        help="train nothing: the tables from the runs in the committed results.json",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.epochs, args.seeds = 20, 2, 1
        args.workdir_root = args.workdir_root or f"/tmp/sdjax_quick/workdirs/{NAME}"
        args.out = args.out or f"/tmp/sdjax_quick/{NAME}"
    args.workdir_root = args.workdir_root or str(common.REPO_ROOT / "workdirs" / NAME)
    return args


def write_report(
    args, runs, out_dir: pathlib.Path, *, finished: bool, runs_prov: dict | None = None
) -> dict[str, Any]:
    """Writes results.json and results.md for the runs so far; returns the results dict.

    `runs_prov`: the provenance of the call that recorded `runs` when they were read from the
    committed results.json (`--aggregate_only`), kept as `runs_provenance`."""
    diff = paired_difference(runs)
    prov = common.provenance()
    title = (
        f"ResNet-{args.depth} on digits, {args.epochs} epochs, linear drop rate to 0.5, "
        f"scale_by_keep=True, {args.seeds} seeds"
    )
    results = {
        "experiment": "row-subset vs masked row stochastic depth on digits",
        "finished": finished,
        "args": vars(args),
        "config": CONFIG,
        "paired_difference": diff,
        "runs": runs,
        "provenance": prov,
    }
    if runs_prov is not None:
        results["runs_provenance"] = runs_prov
    status = "" if finished else "**Partial results (the run is still going).**\n\n"
    md = (
        f"# Row-subset vs masked row stochastic depth on digits\n\n{status}{title}. Config "
        f"`{CONFIG}` (SGD with Nesterov momentum, step schedule, batch 64); the variants differ "
        "only in `model.drop_mode`. Test set: the fixed 360-image digits split; test error after "
        "the last epoch, mean ± std over seeds. **Paired analysis**: a seed fixes the "
        "initialization, data order and drop key of both variants, so the runs pair by seed and "
        "the difference is the mean of the per-seed differences with a 95% t interval on n - 1 "
        "df; all seeds reported, none excluded. Epoch time: median epoch after the first (a "
        "training log, not a benchmark).\n\n"
        + results_table(runs)
        + "\n"
        + difference_text(diff)
        + "\n\nPer-run commands are in `results.json` (`runs[*].command`).\n"
    )
    note = (
        f"- The runs were recorded by `{runs_prov['command']}` ({runs_prov['date_utc']}, git "
        f"commit `{runs_prov['git_commit']}`; see `NOTES.md`); this table is regenerated from "
        "them by the command above, nothing retrained\n"
        if runs_prov is not None
        else ""
    )
    md = common.write_report(out_dir, results, md, note)
    return results


def _run_plan(args, base: dict[str, Any], variant: str, seed: int):
    """``(workdir, overrides)`` of one run: what training and ``--aggregate_only`` both plan."""
    workdir = (
        pathlib.Path(args.workdir_root)
        / f"depth{args.depth}_ep{args.epochs}"
        / f"{variant}_seed{seed}"
    )
    return workdir, {**base, **variant_overrides(variant), "seed": seed}


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    base = {
        "model.name": f"cifar_resnet{args.depth}",
        "train.num_epochs": args.epochs,
        "train.eval_every_epochs": args.epochs,
    }
    runs = []
    if args.aggregate_only:
        committed, runs_prov = common.committed_runs(out_dir)
        for seed in range(args.seeds):
            for variant in VARIANTS:
                workdir, overrides = _run_plan(args, base, variant, seed)
                planned = common.train_command(CONFIG, workdir, overrides)
                run = common.find_run(committed, variant, seed, planned)
                if run is not None:
                    runs.append(run)
        complete = len(runs) == args.seeds * len(VARIANTS)
        results = write_report(args, runs, out_dir, finished=complete, runs_prov=runs_prov)
        print((out_dir / "results.md").read_text(encoding="utf-8"))
        return results
    start = time.time()
    for seed in range(args.seeds):  # seed-major: partial results are paired
        for variant in VARIANTS:
            workdir, overrides = _run_plan(args, base, variant, seed)
            result = common.train_run(CONFIG, workdir, overrides)
            result.pop("curves")
            runs.append({"variant": variant, "seed": seed, **result})
            print(
                f"[{time.time() - start:7.0f} s] {variant:10s} seed {seed}: test error "
                f"{100 * result['test_error']:.2f}%, train time {result['train_time_s']:.0f} s"
                + (" (reused)" if result["reused"] else ""),
                flush=True,
            )
            write_report(args, runs, out_dir, finished=False)
    results = write_report(args, runs, out_dir, finished=True)
    print((out_dir / "results.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
