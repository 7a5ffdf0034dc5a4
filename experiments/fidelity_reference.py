"""Fidelity check: the stochastic-depth test-error gap in sdjax vs an independent PyTorch reference.

Both frameworks train the same network (CIFAR ResNet, digits, `configs/digits_sd.py`'s recipe;
the PyTorch side is `experiments/reference_torch.py`) constant depth (`final_drop_rate=0`) and
with stochastic depth (linear to 0.5, batch mode), on the same seeds. The SD-minus-constant gap
of the mean test error is reported per framework with a 95% Welch t interval (and a percentile
bootstrap interval), and the difference of the two gaps with its Welch-type interval.

Runs are seed-major and resumable: sdjax runs reuse `workdirs/fidelity_reference/sdjax/...`
(`results.json`), PyTorch runs reuse `workdirs/fidelity_reference/torch/<variant>_seed<s>.json`.
`--aggregate_only` writes the tables from whatever runs have finished.

    OMP_NUM_THREADS=1 taskset -c 1 python -m experiments.fidelity_reference --depth 32 \\
        --epochs 15 --seeds 10

Outputs: `experiments/results/fidelity_reference/` (`results.json`, `results.md`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import common, fidelity_stats

NAME = "fidelity_reference"
CONFIG = "configs/digits_sd.py"
VARIANTS = ("constant", "sd")
FRAMEWORKS = ("sdjax", "torch")


def sdjax_overrides(variant: str, depth: int, epochs: int, seed: int) -> dict[str, Any]:
    """Config overrides of one sdjax run (`sd`: linear to 0.5, batch mode, as the config)."""
    rate = {"constant": 0.0, "sd": 0.5}[variant]
    return {
        "model.name": f"cifar_resnet{depth}",
        "model.final_drop_rate": rate,
        "model.drop_schedule": "linear",
        "model.drop_mode": "batch",
        "train.num_epochs": epochs,
        "train.eval_every_epochs": epochs,
        "seed": seed,
    }


def torch_command(variant: str, seed: int, depth: int, epochs: int, out: pathlib.Path) -> list:
    return [
        "python",
        "-m",
        "experiments.reference_torch",
        f"--variant={variant}",
        f"--seed={seed}",
        f"--depth={depth}",
        f"--epochs={epochs}",
        f"--out={out}",
    ]


def run_torch(command: Sequence[str], result_path: pathlib.Path) -> dict[str, Any]:
    reused = result_path.exists()
    if not reused:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, *command[1:]]
        subprocess.run(argv, cwd=common.REPO_ROOT, env=env, check=True, capture_output=True)
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["command"] = " ".join(command)
    result["reused"] = reused
    return result


def gap_rows(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per framework: mean test errors, SD-minus-constant gap, Welch and bootstrap CIs.

    Frameworks with fewer than 2 finished runs of either variant get intervals of `None`.
    """
    groups = fidelity_stats.group_runs(runs, ("framework", "variant"))
    rows = []
    for fw in dict.fromkeys(r["framework"] for r in runs):
        const = [r["test_error"] for r in groups.get((fw, "constant"), [])]
        sd = [r["test_error"] for r in groups.get((fw, "sd"), [])]
        row: dict[str, Any] = {
            "framework": fw,
            "n_constant": len(const),
            "n_sd": len(sd),
            "constant": fidelity_stats.mean_ci(const, confidence) if const else None,
            "sd": fidelity_stats.mean_ci(sd, confidence) if sd else None,
            "gap_welch": None,
            "gap_bootstrap": None,
        }
        if len(const) >= 2 and len(sd) >= 2:
            row["gap_welch"] = fidelity_stats.welch_diff_interval(sd, const, confidence)
            row["gap_bootstrap"] = fidelity_stats.bootstrap_diff_interval(sd, const, confidence)
        rows.append(row)
    return rows


def gap_difference(rows: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict | None:
    """sdjax gap minus torch gap, normal-approximation interval from the two Welch SEs."""
    by = {r["framework"]: r for r in rows}
    if not all(fw in by and by[fw]["gap_welch"] for fw in FRAMEWORKS):
        return None
    from scipy import stats

    a, b = by["sdjax"]["gap_welch"], by["torch"]["gap_welch"]
    diff = a["diff"] - b["diff"]
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "se": se}


def _pct(x: float | None, digits: int = 2) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"
    )


def gap_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        c, s, w, b = r["constant"], r["sd"], r["gap_welch"], r["gap_bootstrap"]
        body.append(
            [
                r["framework"],
                f"{r['n_constant']} / {r['n_sd']}",
                f"{_pct(c['mean'])} ± {_pct(c['std'])}" if c else "n/a",
                f"{_pct(s['mean'])} ± {_pct(s['std'])}" if s else "n/a",
                f"{_pct(w['diff'])} [{_pct(w['low'])}, {_pct(w['high'])}]" if w else "n/a",
                f"[{_pct(b['low'])}, {_pct(b['high'])}]" if b else "n/a",
            ]
        )
    return common.markdown_table(
        [
            "framework",
            "runs (constant / SD)",
            "constant test error (%) mean ± std",
            "SD test error (%) mean ± std",
            "gap SD - constant (pp) [95% Welch t]",
            "gap [95% bootstrap]",
        ],
        body,
    )


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    body = [
        [
            r["framework"],
            r["variant"],
            r["seed"],
            _pct(r["test_error"]),
            f"{r['final_train_loss']:.4f}" if r.get("final_train_loss") is not None else "n/a",
            f"{r['train_time_s']:.1f}",
        ]
        for r in sorted(runs, key=lambda r: (r["framework"], r["variant"], r["seed"]))
    ]
    return common.markdown_table(
        ["framework", "variant", "seed", "test error (%)", "final train loss", "train time (s)"],
        body,
    )


def collect(args, workdir_root: pathlib.Path, run_missing: bool) -> list[dict[str, Any]]:
    runs = []
    start = time.time()
    tag = f"depth{args.depth}_ep{args.epochs}"
    for seed in range(args.seeds):
        for variant in VARIANTS:
            for fw in FRAMEWORKS:
                if fw == "sdjax":
                    workdir = workdir_root / "sdjax" / tag / f"{variant}_seed{seed}"
                    if not run_missing and not (workdir / "results.json").exists():
                        continue
                    command = common.train_command(
                        CONFIG, workdir, sdjax_overrides(variant, args.depth, args.epochs, seed)
                    )
                    res = common.run_training(command, workdir)
                    res = {
                        k: res.get(k)
                        for k in (
                            "test_error",
                            "final_train_loss",
                            "train_time_s",
                            "steps",
                            "command",
                            "reused",
                        )
                    }
                else:
                    out = workdir_root / "torch" / tag
                    path = out / f"{variant}_seed{seed}.json"
                    if not run_missing and not path.exists():
                        continue
                    res = run_torch(
                        torch_command(variant, seed, args.depth, args.epochs, out), path
                    )
                    res.pop("framework", None)
                runs.append({"framework": fw, "variant": variant, "seed": seed, **res})
                if run_missing:
                    print(
                        f"[{time.time() - start:6.0f} s] {fw:5s} {variant:8s} seed {seed}: "
                        f"test error {100 * res['test_error']:.2f}%",
                        flush=True,
                    )
    return runs


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument("--workdir_root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    workdir_root = pathlib.Path(args.workdir_root or common.REPO_ROOT / "workdirs" / NAME)
    out_dir = common.results_dir(NAME, args.out)
    runs = collect(args, workdir_root, run_missing=not args.aggregate_only)
    rows = gap_rows(runs)
    diff = gap_difference(rows)
    prov = common.provenance()
    prov["versions"].update(common.versions(("torch", "scikit-learn", "scipy")))
    prov["machine"]["isa"] = fidelity_stats.cpu_isa()
    results = {
        "experiment": "fidelity: sdjax vs PyTorch reference, SD-minus-constant gap on digits",
        "args": vars(args),
        "config": CONFIG,
        "gaps": rows,
        "gap_difference_sdjax_minus_torch": diff,
        "runs": runs,
        "provenance": prov,
    }
    common.write_json(out_dir / "results.json", results)
    diff_line = (
        f"Difference of the gaps (sdjax - torch): {_pct(diff['diff'])} pp, 95% interval "
        f"[{_pct(diff['low'])}, {_pct(diff['high'])}] (normal approximation from the two Welch "
        "standard errors).\n\n"
        if diff
        else ""
    )
    md = (
        f"# Fidelity: sdjax vs an independent PyTorch reference (digits)\n\n"
        f"ResNet-{args.depth}, {args.epochs} epochs, recipe of `{CONFIG}` (SGD Nesterov 0.9, "
        "weight decay 1e-4 on all parameters, lr 0.1, 1-epoch linear warm-up, /10 at 50% and 75%, "
        "batch 64, pad-1 crops); constant depth vs stochastic depth linear to 0.5, batch mode, "
        "eval-time scaling by the survival probability. Test error on the 360-image digits test "
        "split after the last epoch. Gap = mean(SD) - mean(constant) in percentage points; "
        "intervals: 95% Welch t interval on the difference of means, and a percentile bootstrap "
        "(10,000 resamples, each sample resampled separately).\n\n"
        + gap_table(rows)
        + "\n"
        + diff_line
        + "## Runs\n\n"
        + runs_table(runs)
        + "\n## Provenance\n\n"
        + common.provenance_markdown(prov)
        + f"- ISA flags: {prov['machine']['isa']}; runs pinned to one core (`taskset -c 1`, "
        "torch with 1 thread)\n"
    )
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    print(md)
    return results


if __name__ == "__main__":
    main()
