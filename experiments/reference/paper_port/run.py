"""The paper's code, ported to PyTorch, beside sdjax on the confirmatory study's design (PLAN.md).

Trains the port's missing runs (``python -m experiments.reference.paper_torch``, one process per
run, ``--parallel`` at a time), records each under ``results/runs/<variant>_seed<seed>.json``,
and compares them with sdjax's confirmatory records
(``experiments/confirmatory/results/runs/primary/``): ``results/results.{json,md}``::

    python -m experiments.reference.paper_port.run --npz workdirs/cifar10_study.npz
    python -m experiments.reference.paper_port.run --npz ... --device cuda --parallel 4  # GPU
    python -m experiments.reference.paper_port.run --aggregate_only

``--npz``: the confirmatory study's examples, ``python -m sdjax.data.npz_export
--dataset=cifar10 --data_dir=../shared/data/tfds --split=5000,0,1024 --out=...``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import subprocess
import sys
from typing import Any

from experiments import common
from experiments.common import stats
from experiments.reference import compare

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
SDJAX_RECORDS = common.REPO_ROOT / "experiments" / "confirmatory" / "results" / "runs" / "primary"
SEEDS = tuple(range(100, 109))
VARIANTS = ("constant", "sd")
DEPTH, EPOCHS, EVAL_EVERY = 20, 320, 10
ENDPOINTS = {
    "best_val": "test error at the best-validation epoch (primary)",
    "last": "test error at the last epoch",
}


def port_command(variant: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The port's command line for one run of the plan."""
    return [
        sys.executable,
        "-m",
        "experiments.reference.paper_torch",
        f"--variant={variant}",
        f"--seed={seed}",
        f"--depth={DEPTH}",
        f"--epochs={args.epochs}",
        f"--eval_every={EVAL_EVERY}",
        f"--npz={pathlib.Path(args.npz).resolve()}",
        f"--device={args.device}",
        f"--threads={args.threads}",
        f"--out={args.runs_dir}",
    ]


def train_missing(args: argparse.Namespace) -> list[str]:
    """Runs the plan's unrecorded port runs, ``args.parallel`` at a time; returns the failures."""
    runs_dir = pathlib.Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    pending = [
        (v, s) for s in SEEDS for v in VARIANTS if not (runs_dir / f"{v}_seed{s}.json").exists()
    ]

    def train(run: tuple[str, int]) -> int:
        name = f"{run[0]}_seed{run[1]}"
        with open(logs / f"{name}.log", "w") as log:
            code = subprocess.call(
                port_command(*run, args), cwd=common.REPO_ROOT, stdout=log, stderr=log
            )
        print(f"{name}: exit {code}", flush=True)
        return code

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(train, pending))
    return [f"{v}_seed{s}" for (v, s), code in zip(pending, codes, strict=True) if code]


def load_runs(sdjax_dir: pathlib.Path, runs_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Both frameworks' runs as ``{"framework", "variant", "seed", "best_val", "last"}``."""
    # framework: (folder, the record's variant key, its best-validation test error key)
    sources = {
        "sdjax": (sdjax_dir, "arm", "test_error_at_best_val"),
        "torch": (runs_dir, "variant", "test_error_at_best_valid"),
    }
    runs = []
    for framework, (folder, variant, best_val) in sources.items():
        for path in sorted(folder.glob("*.json")):
            r = json.loads(path.read_text())
            runs.append(
                {
                    "framework": framework,
                    "variant": r[variant],
                    "seed": r["seed"],
                    "best_val": r[best_val],
                    "last": r["test_error"],
                }
            )
    return [r for r in runs if r["seed"] in SEEDS and r["variant"] in VARIANTS]


def analyse(runs: list[dict[str, Any]], epochs: int = EPOCHS) -> dict[str, Any]:
    """Per endpoint: each framework's paired gap and the difference of the gaps (PLAN.md)."""
    planned = len(SEEDS) * len(VARIANTS)
    counts = {fw: sum(r["framework"] == fw for r in runs) for fw in compare.FRAMEWORKS}
    out: dict[str, Any] = {
        "runs": counts,
        "planned_per_framework": planned,
        "epochs": epochs,
        "endpoints": {},
    }
    out["complete"] = all(n == planned for n in counts.values())
    for key, label in ENDPOINTS.items():
        as_error = [{**r, "test_error": r[key]} for r in runs]
        rows = compare.gap_rows(as_error)
        constant = {
            fw: [r[key] for r in runs if r["framework"] == fw and r["variant"] == "constant"]
            for fw in compare.FRAMEWORKS
        }
        entry = {"label": label, "gaps": rows, "gap_difference": compare.gap_difference(rows)}
        if all(len(v) >= 2 for v in constant.values()):
            entry["constant_difference"] = stats.welch_diff_interval(
                constant["sdjax"], constant["torch"]
            )
        out["endpoints"][key] = entry
    return out


def _interval(ci: dict[str, float], what: str) -> str:
    return (
        f"{what}: {common.pct(ci['diff'])} points, 95% interval [{common.pct(ci['low'])}, "
        f"{common.pct(ci['high'])}] (df {ci['df']:.1f})."
    )


def to_markdown(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{fw} {n}" for fw, n in result["runs"].items())
    status = (
        "complete"
        if result["complete"]
        else f"**PARTIAL**: runs recorded {counts} of {result['planned_per_framework']} each"
    )
    lines = [
        "# The paper's code (PyTorch port) beside sdjax: confirmatory design",
        "",
        f"Status: {status}. ResNet-20, the confirmatory study's 1,024 / 5,000 / 10,000 CIFAR-10 "
        f"images, {result['epochs']} epochs, evaluated every {EVAL_EVERY}, seeds {SEEDS[0]}-{SEEDS[-1]} "
        "(PLAN.md). Per framework the gap is paired by seed (mean of per-seed SD - constant "
        "differences, t interval on n - 1 df); the frameworks are not paired with each other, "
        "so the difference of the gaps is a t interval from the two gaps' standard errors "
        "(Satterthwaite df), and the constant-depth errors are compared by Welch's interval.",
    ]
    for entry in result["endpoints"].values():
        lines += ["", f"## {entry['label']}", "", compare.gap_table(entry["gaps"]).strip()]
        if entry["gap_difference"]:
            lines += ["", _interval(entry["gap_difference"], "Gap difference, sdjax - port")]
        if "constant_difference" in entry:
            lines += ["", _interval(entry["constant_difference"], "Constant depth, sdjax - port")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=None, help="the confirmatory study's pre-split export")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="port runs at a time")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--aggregate_only", action="store_true", help="train nothing")
    parser.add_argument("--runs_dir", default=str(RESULTS / "runs"))
    parser.add_argument("--sdjax_records", default=str(SDJAX_RECORDS))
    parser.add_argument("--logs", default=str(common.REPO_ROOT / "workdirs" / "paper_port"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    runs_dir = pathlib.Path(args.runs_dir)
    if args.epochs != EPOCHS and runs_dir.resolve() == (RESULTS / "runs").resolve():
        parser.error(
            f"--epochs={args.epochs} differs from PLAN.md's {EPOCHS}; use another --runs_dir"
        )
    if not args.aggregate_only:
        if not args.npz:
            parser.error("--npz is required to train (or pass --aggregate_only)")
        failed = train_missing(args)
        if failed:
            print(f"failed runs (see their logs in {args.logs}): {failed}", flush=True)
    result = analyse(load_runs(pathlib.Path(args.sdjax_records), runs_dir), args.epochs)
    result["provenance"] = common.provenance()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "results.json", result)
    (out / "results.md").write_text(to_markdown(result), encoding="utf-8")
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
