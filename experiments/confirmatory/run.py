"""The pre-registered confirmatory test of stochastic depth (``PLAN.md`` beside this file).

Trains the plan's runs (each arm, each seed) with ``python -m sdjax.main`` and the paper's recipe
(``configs/cifar10_sd.py`` / ``configs/cifar10_constant.py``), records each finished run under
``results/runs/<study>/<arm>_seed<seed>.json`` (commit these as they come), and writes the
paired analysis the plan fixes: ``results/<study>/results.{json,md}``.

Studies (``--study``), all on CIFAR-10, a fixed random subset of ``--train_size`` of the 45k
training part (``input.train_size``, ``split_seed`` 0), validated on the 5k, tested on the 10k:

* ``primary``: ResNet-20, 320 epochs, arms ``constant`` and ``sd``, seeds 100-108;
* ``deep56``: ResNet-56, the same subset and budget, arms ``constant`` and ``sd``, seeds 100-104;
* ``warmup``: ResNet-20 as ``primary``, arm ``warmup`` (``sd`` with the drop rates ramped up
  over the first 25% of the steps), seeds 100-108, compared with ``primary``'s constant runs;
* ``warmup_confirm``: the pre-registered replication of ``warmup``'s result on fresh seeds
  (``PLAN_warmup_confirm.md``): ResNet-20 as ``primary``, arms ``constant`` and ``warmup``,
  seeds 200-208.

One process per core, each taking the next unclaimed run of the plan::

    for k in 0 1; do nohup taskset -c $k python -m experiments.confirmatory.run \\
        --study primary --data_dir ../shared/data/tfds > confirmatory_$k.log 2>&1 & done
    python -m experiments.confirmatory.run --study primary --aggregate_only

A run interrupted (a session ended) resumes from its checkpoint when the same command runs
again; a recorded run is never retrained.

On a host without TensorFlow (an accelerator host), ``--npz`` reads the study's examples from a
pre-split export instead of the tfds folder: the same 1,024 training, 5,000 validation and
10,000 test images (``python -m sdjax.data.npz_export --dataset=cifar10 --split=5000,0,1024``,
45.7 MB); ``device.sh`` beside this file runs a study that way, several runs at once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
from typing import Any

from experiments import common
from experiments.confirmatory import analysis

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKDIRS = common.REPO_ROOT / "workdirs" / "confirmatory"
"""Committed records and tables; the runs' workdirs (not committed)."""
CONFIGS = {
    "constant": "configs/cifar10_constant.py",
    "sd": "configs/cifar10_sd.py",
    "warmup": "configs/cifar10_sd.py",
}
STUDIES: dict[str, dict[str, Any]] = {
    "primary": {"model": "cifar_resnet20", "arms": ("constant", "sd"), "seeds": range(100, 109)},
    "deep56": {"model": "cifar_resnet56", "arms": ("constant", "sd"), "seeds": range(100, 105)},
    "warmup": {"model": "cifar_resnet20", "arms": ("warmup",), "seeds": range(100, 109)},
    "warmup_confirm": {
        "model": "cifar_resnet20",
        "arms": ("constant", "warmup"),
        "seeds": range(200, 209),
    },
}
TRAIN_SIZE = 1024
EPOCHS = 320
EVAL_EVERY_EPOCHS = 10


def overrides(model: str, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of one run, beyond its config file (the paper's recipe)."""
    fields: dict[str, Any] = {
        "seed": seed,
        "model.name": model,
        "input.train_size": args.train_size,
        "train.num_epochs": args.epochs,
        "train.eval_every_epochs": args.eval_every_epochs,
        "train.progress_bar": False,
        "train.tensorboard": False,
    }
    if args.npz:
        fields["input.npz_path"] = str(pathlib.Path(args.npz).resolve())
    elif args.data_dir:
        fields["input.data_dir"] = args.data_dir
    if arm == "warmup":
        fields["train.drop_warmup_fraction"] = 0.25
    return fields


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run of ``args.study``: ``{"arm", "seed", "command", "workdir", "record"}``."""
    study = STUDIES[args.study]
    runs = []
    for seed in study["seeds"]:
        for arm in study["arms"]:
            name = f"{arm}_seed{seed}"
            workdir = pathlib.Path(args.workdirs) / args.study / name
            fields = overrides(study["model"], arm, seed, args)
            command = common.train_command(CONFIGS[arm], workdir, fields)
            record = pathlib.Path(args.results_dir) / "runs" / args.study / f"{name}.json"
            runs.append(
                {"arm": arm, "seed": seed, "command": command, "workdir": workdir, "record": record}
            )
    return runs


def record_of(run: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a finished run: its errors, per-epoch times and provenance."""
    epoch_times = [
        r["epoch_time_s"]
        for r in common.read_jsonl(pathlib.Path(run["workdir"]) / "metrics.jsonl")
        if "epoch_time_s" in r
    ]
    return {
        "arm": run["arm"],
        "seed": run["seed"],
        "test_error_at_best_val": results["test_error_at_best_val"],
        "test_error": results["test_error"],
        "best_val_epoch": results["best_val_epoch"],
        "best_val_accuracy": results["best_val_accuracy"],
        "final_train_loss": results["final_train_loss"],
        "train_time_s": results["train_time_s"],
        "median_epoch_time_s": common.steady_epoch_time(epoch_times),
        "epoch_times_s": epoch_times,
        "command": shlex.join(str(x) for x in run["command"]),
        "versions": results.get("versions"),
        "devices": results.get("devices"),
        "machine": common.machine(),
    }


def train_missing(runs: list[dict[str, Any]], max_runs: int | None = None) -> None:
    """Trains the runs without a record that no other process has claimed, in plan order."""
    trained = 0
    for run in runs:
        if max_runs is not None and trained >= max_runs:
            return
        if run["record"].exists() or not common.claim(run["workdir"]):
            continue
        trained += 1
        results = common.run_training(run["command"], run["workdir"])
        run["record"].parent.mkdir(parents=True, exist_ok=True)
        common.write_json(run["record"], record_of(run, results))
        (pathlib.Path(run["workdir"]) / "claim.pid").unlink(missing_ok=True)
        print(f"recorded {run['record']}", flush=True)


def load_records(results_dir: pathlib.Path, study: str) -> list[dict[str, Any]]:
    folder = results_dir / "runs" / study
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="primary")
    parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR"))
    parser.add_argument(
        "--npz", default=None, help="a pre-split export of the study's examples (no tfds)"
    )
    parser.add_argument("--train_size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--eval_every_epochs", type=int, default=EVAL_EVERY_EPOCHS)
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--workdirs", default=str(WORKDIRS))
    parser.add_argument("--max_runs", type=int, default=None, help="train at most this many")
    args = parser.parse_args(argv)
    planned = (args.train_size, args.epochs, args.eval_every_epochs)
    fixed = (TRAIN_SIZE, EPOCHS, EVAL_EVERY_EPOCHS)
    results_dir = pathlib.Path(args.results_dir)
    if planned != fixed and results_dir.resolve() == RESULTS:
        parser.error(
            f"--train_size/--epochs/--eval_every_epochs={planned} differ from the plan's {fixed}; "
            "such runs (smoke tests) need another --results_dir"
        )
    if not args.aggregate_only:
        train_missing(plan(args), args.max_runs)
    records = {name: load_records(results_dir, name) for name in STUDIES}
    out = results_dir / args.study
    result = analysis.analyse(args.study, records, len(plan(args)))
    common.write_json(out / "results.json", result)
    (out / "results.md").write_text(analysis.to_markdown(result) + "\n")
    print(f"wrote {out}/results.md")


if __name__ == "__main__":
    main()
