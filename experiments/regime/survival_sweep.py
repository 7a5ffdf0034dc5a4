"""The survival-probability sweep (the paper's Figure 8): its rules, its points, and its digits runs.

The sweep is defined once, here: test error against the last block's drop rate `p_L` under the
linear rule (block l of L drops with p_L * l / L) and the uniform rule (every block drops with
p_L), `p_L = 0` being constant depth, one set of runs shared by both rules (`by_rule`). A point
is named `variant_name(rule, p_L)` (`linear0.2`, `uniform0.8`, `constant`); the regime study
(`experiments.regime.run`, CIFAR-10 subset) trains such variants and tabulates them with
`experiments.regime.report`, which groups them with `by_rule`.

Test error as a function of the final drop rate `p_L` (= 1 - the paper's survival probability of the
last block), for the linear-decay rule and the uniform rule, on a deep CIFAR ResNet trained on the
scikit-learn digits with `configs/digits_sd.py` is this module's runner. The runs are made by the
sweep tool (`python -m experiments.sweep`; a subprocess and a workdir per run; finished runs are
skipped, interrupted ones resume), the workdirs live in `workdirs/survival_sweep/` (git-ignored),
and this script aggregates them into the figure.

Full run (ResNet-56, 15 epochs, 6 rates x 2 rules (rate 0 once) x 2 seeds = 22 runs: about 60-70
minutes on two otherwise idle CPU cores; step 0.1 (`--rates 0 0.1 0.2 ... 0.9`) doubles it):

    python -m experiments.regime.survival_sweep --depth 56 --epochs 15 --seeds 2 \\
        --rates 0 0.1 0.3 0.5 0.7 0.9

The committed results (ResNet-32, 10 epochs, 2 seeds, step 0.1: 38 runs, about 25 minutes):

    python -m experiments.regime.survival_sweep --depth 32 --epochs 10 --seeds 2 \
        --rates 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9

Smoke run (ResNet-20, 1 epoch, rates 0 and 0.5, 1 seed; ~3 minutes; writes to /tmp):

    python -m experiments.regime.survival_sweep --quick

Outputs in `experiments/regime/results/survival_digits/`: `results.md`, `survival_sweep.png`, `results.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from experiments import common
from experiments.sweep import sweep

NAME = "survival_sweep"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "survival_digits"
CONFIG = "configs/digits_sd.py"
RULES = ("linear", "uniform")
_VARIANT = re.compile(r"^(linear|uniform)(\d+(?:\.\d+)?)$")


def variant_name(rule: str, final_drop_rate: float) -> str:
    """The name of a sweep point: ``constant`` at p_L = 0, else ``<rule><p_L>`` (``uniform0.8``)."""
    return "constant" if final_drop_rate == 0 else f"{rule}{final_drop_rate:g}"


def parse_variant(variant: str) -> tuple[str, float] | None:
    """``"uniform0.8"`` -> ``("uniform", 0.8)``; None for a name that is no sweep point > 0."""
    m = _VARIANT.match(variant)
    return None if m is None else (m.group(1), float(m.group(2)))


def by_rule(
    points: Iterable[tuple[str | None, float, Any]], rules: Sequence[str] = RULES
) -> dict[str, list[tuple[float, Any]]]:
    """``(rule, p_L, item)`` points -> per rule, its ``(p_L, item)`` sorted by p_L.

    A point at p_L = 0 (constant depth) belongs to every rule, whatever its `rule`.
    """
    out: dict[str, list[tuple[float, Any]]] = {rule: [] for rule in rules}
    for rule, rate, item in points:
        for target in rules if rate == 0 else [rule] if rule in out else []:
            out[target].append((rate, item))
    return {rule: sorted(pts, key=lambda p: p[0]) for rule, pts in out.items()}


def sweep_argvs(args: argparse.Namespace, sweep_dir: str) -> list[list[str]]:
    """The sweep tool's argument lists: rate 0 once, then rates > 0 x both rules."""
    seeds = ",".join(str(s) for s in range(args.seeds))
    common_flags = [
        f"--config={CONFIG}",
        f"--sweep_dir={sweep_dir}",
        f"--grid=seed={seeds}",
        f"--config.model.name=cifar_resnet{args.depth}",
        f"--config.train.num_epochs={args.epochs}",
    ]
    argvs = []
    if 0.0 in args.rates:
        argvs.append([*common_flags, "--grid=model.final_drop_rate=0.0"])
    positive = [r for r in args.rates if r > 0]
    if positive:
        rates = ",".join(str(r) for r in positive)
        argvs.append(
            [
                *common_flags,
                f"--grid=model.final_drop_rate={rates}",
                f"--grid=model.drop_schedule={','.join(args.rules)}",
            ]
        )
    return argvs


def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per results.json under `sweep_dir`: rate, rule, seed, test error, time."""
    records = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "**", "results.json"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        model = result["config"]["model"]
        records.append(
            {
                "final_drop_rate": float(model["final_drop_rate"]),
                "rule": model["drop_schedule"],
                "seed": int(result["config"]["seed"]),
                "test_error": float(result["test_error"]),
                "train_time_s": float(result["train_time_s"]),
                "workdir": os.path.dirname(path),
            }
        )
    return records


def curves(records: Sequence[dict[str, Any]], rules: Sequence[str] = RULES) -> dict[str, Any]:
    """Per rule: sorted rates with mean/std test error and time; rate-0 runs count for every rule."""
    out = {}
    points = by_rule(((r["rule"], r["final_drop_rate"], r) for r in records), rules)
    for rule, pts in points.items():
        by_rate: dict[float, list[dict[str, Any]]] = {}
        for p, r in pts:
            by_rate.setdefault(p, []).append(r)
        rates = sorted(by_rate)
        out[rule] = {
            "final_drop_rate": rates,
            "num_runs": [len(by_rate[p]) for p in rates],
            "test_error": [common.mean_std([r["test_error"] for r in by_rate[p]]) for p in rates],
            "train_time_s": [
                common.mean_std([r["train_time_s"] for r in by_rate[p]]) for p in rates
            ],
        }
    return out


def results_table(curve: dict[str, Any]) -> str:
    """Rates as rows, one test-error column and one time column per rule."""
    rules = list(curve)
    rates = sorted({p for c in curve.values() for p in c["final_drop_rate"]})
    rows = []
    for p in rates:
        row: list[Any] = [f"{p:g}", f"{1 - p:g}"]
        for rule in rules:
            c = curve[rule]
            if p in c["final_drop_rate"]:
                i = c["final_drop_rate"].index(p)
                m, s = c["test_error"][i]
                t = c["train_time_s"][i][0]
                row += [f"{100 * m:.2f} ± {100 * s:.2f} (n={c['num_runs'][i]})", f"{t:.0f}"]
            else:
                row += ["", ""]
        rows.append(row)
    headers = ["final drop rate p_L", "survival prob. of the last block (1 - p_L)"]
    for rule in rules:
        headers += [f"{rule}: test error (%)", f"{rule}: train time (s)"]
    return common.markdown_table(headers, rows)


def plot(path: pathlib.Path, curve: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"linear": "tab:blue", "uniform": "tab:orange"}
    for rule in curve:
        color = colors.get(rule)
        c = curve[rule]
        rates = c["final_drop_rate"]
        mean = [100 * m for m, _ in c["test_error"]]
        std = [100 * s for _, s in c["test_error"]]
        axes[0].errorbar(rates, mean, yerr=std, fmt="o-", color=color, capsize=4, label=rule)
        axes[1].plot(rates, [t for t, _ in c["train_time_s"]], "o-", color=color, label=rule)
    axes[0].set_xlabel("final drop rate p_L (1 - survival probability)")
    axes[0].set_ylabel("test error (%)")
    axes[0].set_title("test error (mean ± std over seeds)")
    axes[1].set_xlabel("final drop rate p_L")
    axes[1].set_ylabel("training time (s)")
    axes[1].set_title("wall-clock training time")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    common.save_figure(fig, path, title)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 1 epoch, rates 0, 0.5")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--sweep_dir", default=None, help="default workdirs/survival_sweep/...")
    parser.add_argument("--out", default=None, help=f"default {RESULTS_DIR}")
    parser.add_argument("--aggregate_only", action="store_true", help="no new runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.epochs, args.seeds, args.rates = 20, 1, 1, [0.0, 0.5]
        args.sweep_dir = args.sweep_dir or "/tmp/sdjax_quick/workdirs/survival_sweep"
        args.out = args.out or "/tmp/sdjax_quick/survival_sweep"
    args.sweep_dir = args.sweep_dir or str(
        common.REPO_ROOT / "workdirs" / NAME / f"depth{args.depth}_ep{args.epochs}"
    )
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    argvs = sweep_argvs(args, args.sweep_dir)
    if not args.aggregate_only:
        for sweep_argv in argvs:
            sweep.main(sweep_argv)
    records = collect(args.sweep_dir)
    if not records:
        raise SystemExit(f"no results.json under {args.sweep_dir}")
    curve = curves(records, args.rules)
    prov = common.provenance()
    title = f"ResNet-{args.depth} on digits, {args.epochs} epochs: final drop rate sweep"
    results = {
        "experiment": "3: survival-probability sweep (paper Figure 8) on digits",
        "args": vars(args),
        "sweep_commands": ["python -m experiments.sweep " + " ".join(a) for a in argvs],
        "curves": curve,
        "runs": records,
        "provenance": prov,
    }
    plot(out_dir / f"{NAME}.png", curve, title)
    md = (
        f"# Experiment 3: final drop rate sweep (paper Figure 8) on digits\n\n{title}; "
        f"{args.seeds} seeds per point; config `{CONFIG}` (batch mode, step schedule). "
        "p_L = 0 is constant depth (the same runs in both columns). The paper's survival "
        "probability of the last block is 1 - p_L.\n\n"
        + results_table(curve)
        + f"\n![test error vs final drop rate]({NAME}.png)\n\nThe runs were made with:\n\n"
        + "".join(f"    {c}\n" for c in results["sweep_commands"])
    )
    md = common.write_report(out_dir, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main()
