"""The paper's full-scale CIFAR-10 experiment: ResNet-110, 500 epochs, constant depth vs stochastic
depth, paired by seed, on a host without TensorFlow (see README.md beside this file).

    bash experiments/fullscale/run.sh cifar10.npz
    python -m experiments.fullscale.run --npz=cifar10.npz --seeds=0,1,2 \\
        --out=experiments/fullscale/results

For each seed in turn, the constant-depth run and then the stochastic-depth run
(``configs/cifar10_constant.py`` and ``configs/cifar10_sd.py``: the paper's recipe) start from
the same weights and see the same data order (the seed fixes both). Each run trains in
``OUT/runs/<arm>_seed<seed>`` on the ``.npz`` export with ``train.tensorboard=False``, so nothing
imports TensorFlow, tfds or clu. Rerunning the command resumes an interrupted run and skips the
finished ones. After every run ``OUT/results.json`` and ``OUT/results.md`` are rewritten from the
runs' ``results.json``: per seed the test error at the best-validation epoch (the paper's
endpoint) and at the last epoch, and the paired SD-minus-constant difference with a t interval
(n - 1 degrees of freedom) over the completed pairs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from experiments import common

__all__ = ["ARMS", "main", "paired_summary", "plan", "results_markdown"]

ARMS = ("constant", "sd")
ENDPOINTS = (
    ("test_error_at_best_val", "test error at the best-validation epoch (primary)"),
    ("test_error", "test error at the last epoch"),
)


def plan(
    npz: str, seeds: Sequence[int], epochs: float, out: str | os.PathLike, extra: str = ""
) -> list[dict[str, Any]]:
    """The runs, in order: for each seed the constant-depth then the SD run.

    Args:
      npz: the CIFAR-10 ``.npz`` export (made absolute).
      seeds: the paired seeds.
      epochs: training epochs (the paper: 500).
      out: the study's output folder; runs go to ``out/runs/<arm>_seed<seed>``.
      extra: more ``key=value`` config arguments (e.g. a smaller model for a test).

    Returns:
      ``[{"arm", "seed", "workdir", "command"}]``, ``command`` the ``python -m sdjax.main``
      argument list.
    """
    npz = os.path.abspath(npz)
    runs = []
    for seed in seeds:
        for arm in ARMS:
            arg = f"seed={seed},epochs={epochs:g}" + (f",{extra}" if extra else "")
            workdir = pathlib.Path(out) / "runs" / f"{arm}_seed{seed}"
            overrides = {
                "input.npz_path": npz,
                "train.tensorboard": False,
                "train.progress_bar": False,
            }
            command = common.train_command(f"configs/cifar10_{arm}.py:{arg}", workdir, overrides)
            runs.append({"arm": arm, "seed": seed, "workdir": str(workdir), "command": command})
    return runs


def paired_summary(results: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Per-seed endpoints and the paired SD-minus-constant analysis of the completed pairs.

    Args:
      results: ``{(arm, seed): the run's results.json}`` (finished runs only).

    Returns:
      ``{"analysis", "pairs": [{"seed", "<arm>_<endpoint>", "diff_<endpoint>", ...}],
      "<endpoint>": {"n", "mean", "std", "half_width"} of the differences (absent for no
      pair)}``; errors are fractions.
    """
    from experiments.common import stats  # noqa: PLC0415 (scipy, for the t quantile)

    seeds = sorted({seed for _, seed in results})
    pairs = []
    for seed in seeds:
        if not all((arm, seed) in results for arm in ARMS):
            continue
        row: dict[str, Any] = {"seed": seed}
        for arm in ARMS:
            r = results[(arm, seed)]
            for key, _ in ENDPOINTS:
                row[f"{arm}_{key}"] = r.get(key)
            row[f"{arm}_best_val_epoch"] = r.get("best_val_epoch")
            row[f"{arm}_train_time_s"] = r.get("train_time_s")
        for key, _ in ENDPOINTS:
            row[f"diff_{key}"] = row[f"sd_{key}"] - row[f"constant_{key}"]
        pairs.append(row)
    names = sorted(
        {r.get("config", {}).get("model", {}).get("name", "?") for r in results.values()}
    )
    summary: dict[str, Any] = {
        "model": ", ".join(names),
        "analysis": "paired by seed: per-seed SD minus constant, mean with a 95% t interval "
        "(n - 1 degrees of freedom); no run excluded",
        "pairs": pairs,
    }
    for key, _ in ENDPOINTS:
        if pairs:
            summary[key] = stats.mean_ci([p[f"diff_{key}"] for p in pairs])
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def results_markdown(summary: dict[str, Any]) -> str:
    """The study's results table (generated; never edit it by hand)."""
    from experiments.common import stats  # noqa: PLC0415 (as in paired_summary)

    rows = [
        [
            p["seed"],
            _pct(p["constant_test_error_at_best_val"]),
            _pct(p["sd_test_error_at_best_val"]),
            _pct(p["diff_test_error_at_best_val"]),
            _pct(p["constant_test_error"]),
            _pct(p["sd_test_error"]),
            _pct(p["diff_test_error"]),
        ]
        for p in summary["pairs"]
    ]
    text = [
        "# Full-scale CIFAR-10: constant depth vs stochastic depth\n",
        f"Model: {summary.get('model') or '-'}. Generated by `experiments/fullscale/run.py`; "
        f"test error in %. Analysis: {summary['analysis']}.\n",
        common.markdown_table(
            [
                "seed",
                "constant, best val",
                "SD, best val",
                "SD - constant",
                "constant, last",
                "SD, last",
                "SD - constant, last",
            ],
            rows,
        ),
    ]
    for key, name in ENDPOINTS:
        ci = summary.get(key)
        if ci is None:
            continue
        if ci["n"] < 2:
            text.append(f"- {name}: SD - constant {_pct(ci['mean'])} (one pair, no interval)\n")
        else:
            low, high = stats.ci_bounds(ci)
            text.append(
                f"- {name}: SD - constant {_pct(ci['mean'])} [{_pct(low)}, {_pct(high)}] "
                f"(n = {ci['n']} pairs)\n"
            )
    return "\n".join(text)


def _read_results(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    import json  # noqa: PLC0415

    out = {}
    for run in runs:
        path = pathlib.Path(run["workdir"]) / "results.json"
        if path.exists():
            out[(run["arm"], run["seed"])] = json.loads(path.read_text(encoding="utf-8"))
    return out


def write_report(runs: Sequence[dict[str, Any]], out: str | os.PathLike) -> dict[str, Any]:
    """Rewrites ``out/results.json`` and ``out/results.md`` from the finished runs."""
    summary = paired_summary(_read_results(runs))
    summary["provenance"] = common.provenance()
    summary["commands"] = [" ".join(r["command"]) for r in runs]
    common.write_json(pathlib.Path(out) / "results.json", summary)
    (pathlib.Path(out) / "results.md").write_text(results_markdown(summary), encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="CIFAR-10 export (sdjax.data.npz_export)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated paired seeds")
    parser.add_argument("--epochs", type=float, default=500)
    parser.add_argument("--out", default="experiments/fullscale/results")
    parser.add_argument("--extra", default="", help="more config arguments, key=value,...")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.npz):
        parser.error(
            f"--npz={args.npz!r} is not a file; write it with `python -m sdjax.data.npz_export "
            "--dataset=cifar10 --out=cifar10.npz` on a machine with tensorflow-datasets."
        )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = plan(args.npz, seeds, args.epochs, args.out, args.extra)
    for run in runs:
        print(" ".join(run["command"]), flush=True)
        if args.dry_run:
            continue
        result = common.run_training(run["command"], run["workdir"])
        print(
            f"{run['arm']} seed {run['seed']}: test error {_pct(result['test_error'])}% (last), "
            f"{_pct(result.get('test_error_at_best_val'))}% at the best validation epoch "
            f"{result.get('best_val_epoch')}; {result['train_time_s']:.0f} s",
            flush=True,
        )
        write_report(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
