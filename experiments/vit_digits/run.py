"""The small ViT on digits in each drop-path mode: test error and training time, paired seeds.

`configs/digits_vit.py` (6 pre-LayerNorm blocks, width 64, drop path on each attention and MLP
branch, timm's ``linspace(0, 0.2, 6)``, 60 epochs) trained in four arms that differ only in
``model.drop_mode`` / ``model.final_drop_rate``:

* ``constant``: ``final_drop_rate=0`` (no drop path; the time reference);
* ``row``: masked per-sample drop path (the config's default);
* ``batch``: one gate per branch for the whole batch, a dropped branch not computed;
* ``row_subset``: each branch computed on exactly ``round((1 - rate) * 64)`` samples.

The plan, fixed before the runs (README.md beside this file): seeds 0, 1, 2 (a seed fixes the
initial weights and data order of every arm, so arms pair by seed), every run on one core
(``taskset``), arms interleaved within a seed. Endpoints: test error after the last epoch
(360 test images) and the steady epoch time (median epoch after the first). Analysis: per arm,
mean ± std; paired by seed, each mode's test error minus ``row``'s and each arm's epoch time
divided by ``constant``'s, 95% t intervals on n - 1 df over the per-seed values; no exclusions.

    taskset -c 1 python -m experiments.vit_digits.run
    python -m experiments.vit_digits.run --aggregate_only   # tables from the committed runs

Outputs: ``results/results.{json,md}`` beside this file; workdirs under ``workdirs/vit_digits/``
(not committed).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

from experiments import common
from experiments.common import stats

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = "configs/digits_vit.py"
ARMS: dict[str, dict[str, Any]] = {
    "constant": {"model.final_drop_rate": 0.0},
    "row": {"model.drop_mode": "row"},
    "batch": {"model.drop_mode": "batch"},
    "row_subset": {"model.drop_mode": "row_subset"},
}


def plan(args: argparse.Namespace) -> list[tuple[str, int, pathlib.Path, dict[str, Any]]]:
    """``(arm, seed, workdir, overrides)`` of every run, seed-major."""
    out = []
    for seed in args.seeds:
        for arm, fields in ARMS.items():
            workdir = pathlib.Path(args.workdirs) / f"{arm}_seed{seed}"
            overrides = {**fields, "seed": seed, "train.tensorboard": False}
            out.append((arm, seed, workdir, overrides))
    return out


def _interval(values: list[float], scale: float = 1.0) -> dict[str, Any] | None:
    if len(values) < 2:
        return None
    ci = stats.mean_ci(values)
    low, high = stats.ci_bounds(ci)
    return {
        "n": ci["n"],
        "mean": scale * ci["mean"],
        "low": scale * low,
        "high": scale * high,
        "per_seed": [scale * v for v in values],
    }


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm summaries and the paired comparisons of the plan."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["variant"]] = run
    out: dict[str, Any] = {"arms": {}, "error_minus_row": {}, "epoch_time_over_constant": {}}
    for arm in ARMS:
        group = [r for r in runs if r["variant"] == arm]
        if not group:
            continue
        out["arms"][arm] = {
            "seeds": len(group),
            "test_error_pct": common.format_mean_std([r["test_error"] for r in group], scale=100),
            "epoch_time_s": common.format_mean_std([r["epoch_time_s"] for r in group]),
            "train_time_s": common.format_mean_std([r["train_time_s"] for r in group], digits=0),
        }
        if arm != "row":
            diffs = stats.paired_differences(runs, "test_error", arm, "row")
            out["error_minus_row"][arm] = _interval(diffs, scale=100)
        if arm != "constant":
            ratios = [
                s[arm]["epoch_time_s"] / s["constant"]["epoch_time_s"]
                for _, s in sorted(by_seed.items())
                if arm in s and "constant" in s
            ]
            out["epoch_time_over_constant"][arm] = _interval(ratios)
    return out


def _cell(ci: dict[str, Any] | None, unit: str = "") -> str:
    if ci is None:
        return "n/a (fewer than 2 pairs)"
    return f"{ci['mean']:+.2f}{unit} [{ci['low']:+.2f}, {ci['high']:+.2f}]"


def _ratio_cell(ci: dict[str, Any] | None) -> str:
    if ci is None:
        return "n/a (fewer than 2 pairs)"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def to_markdown(analysis: dict[str, Any], seeds: list[int], complete: bool) -> str:
    rows = []
    for arm, summary in analysis["arms"].items():
        rows.append(
            [
                arm,
                summary["seeds"],
                summary["test_error_pct"],
                "reference" if arm == "row" else _cell(analysis["error_minus_row"].get(arm)),
                summary["epoch_time_s"],
                "1 (reference)"
                if arm == "constant"
                else _ratio_cell(analysis["epoch_time_over_constant"].get(arm)),
                summary["train_time_s"],
            ]
        )
    headers = [
        "arm",
        "seeds",
        "test error (%)",
        "minus row (points)",
        "epoch time (s)",
        "epoch time / constant",
        "train time (s)",
    ]
    status = "" if complete else "**PARTIAL: not every planned run is recorded.**\n\n"
    return (
        "# The small ViT on digits in each drop-path mode\n\n"
        + status
        + f"`{CONFIG}` (6 blocks, width 64, drop path linspace(0, 0.2, 6) on each attention and "
        f"MLP branch, 60 epochs), seeds {', '.join(map(str, seeds))}, one CPU core per run. "
        "Test error after the last epoch on the 360 test images (one image = 0.28 points), mean "
        "± std over seeds. **Paired analysis**: a seed fixes the initial weights and data order "
        "of every arm; 'minus row' is the mean per-seed difference in test error and 'epoch "
        "time / constant' the mean per-seed ratio of steady epoch times (median epoch after the "
        "first), each with a 95% t interval on n - 1 df. All seeds reported, none excluded. "
        "Times are training logs on a shared host, not a benchmark.\n\n"
        + common.markdown_table(headers, rows)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdirs", default=str(common.REPO_ROOT / "workdirs" / "vit_digits"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--aggregate_only", action="store_true", help="train nothing")
    args = parser.parse_args(argv)
    out = common.results_dir(args.out)
    committed, runs_prov = common.committed_runs(out)
    runs: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        complete = len(runs) == len(args.seeds) * len(ARMS)
        analysis = analyse(runs)
        results = {
            "experiment": "small ViT on digits per drop-path mode",
            "config": CONFIG,
            "seeds": args.seeds,
            "complete": complete,
            "analysis": analysis,
            "runs": runs,
            "provenance": common.provenance(),
        }
        if args.aggregate_only and runs_prov is not None:
            results["runs_provenance"] = runs_prov
        common.write_report(out, results, to_markdown(analysis, args.seeds, complete) + "\n")
        return results

    start = time.time()
    for arm, seed, workdir, overrides in plan(args):
        planned = common.train_command(CONFIG, workdir, overrides)
        run = common.find_run(committed, arm, seed, planned)
        if run is None and not args.aggregate_only:
            record = common.train_run(CONFIG, workdir, overrides)
            record.pop("curves")
            run = {"variant": arm, "seed": seed, **record, "machine": common.machine()}
            print(
                f"[{time.time() - start:6.0f} s] {arm:10s} seed {seed}: test error "
                f"{100 * run['test_error']:.2f}%, epoch {run['epoch_time_s']:.2f} s",
                flush=True,
            )
            runs.append(run)
            report()  # a record survives an interrupted study
        elif run is not None:
            runs.append(run)
    results = report()
    print((out / "results.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
