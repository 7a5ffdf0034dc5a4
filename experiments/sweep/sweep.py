"""Run a config over a grid of overrides, and aggregate the results into a table and a plot.

The general sweep tool (`python -m experiments.sweep`, from the repository root): any config,
any grid of `--config.` overrides. Each run is launched and recorded as every study's runs are
(`experiments.common.train_command` and `run_training`: a workdir per run, its output in
`<workdir>/log.txt`).

Run every combination locally, one after another (a subprocess and a workdir per run)::

    python -m experiments.sweep --config=configs/digits_sd.py --sweep_dir=/tmp/sweep \\
        --grid model.final_drop_rate=0,0.5 --grid model.drop_schedule=linear,uniform \\
        --grid seed=0,1

Print one command per run instead (to submit to a cluster)::

    python -m experiments.sweep --config=configs/cifar10_sd.py --sweep_dir=gs://b/sweep \\
        --grid model.final_drop_rate=0,0.2,0.5 --print_commands

Collect every ``results.json`` under a directory into ``results.md``, ``results.csv`` and
``results.png`` (test error per run, grouped by the swept fields)::

    python -m experiments.sweep --aggregate=/tmp/sweep

Runs that already have a ``results.json`` are skipped, so a rerun finishes an interrupted sweep
(unfinished runs resume from their checkpoints). Arguments this tool does not know are passed to
every run (e.g. ``--config.train.num_epochs=2``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import os
import shlex
import sys

from experiments import common

COLUMNS = ("test_error", "test_accuracy", "test_error_at_best_val", "train_time_s", "steps")


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "seed=0,1"]`` -> ``[("a.b", ["1", "2"]), ("seed", ["0", "1"])]``."""
    grid = []
    for item in items:
        field, sep, values = item.partition("=")
        if not sep or not field or not values:
            raise SystemExit(f"--grid {item!r}: expected FIELD=V1,V2,... e.g. seed=0,1")
        grid.append((field.strip(), [v.strip() for v in values.split(",")]))
    return grid


def run_name(assignment: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in assignment.items()) or "default"


def commands(config: str, sweep_dir: str, grid, extra: list[str]) -> list[tuple[str, list[str]]]:
    """One ``(workdir, argv)`` per grid point."""
    fields = [f for f, _ in grid]
    out = []
    for values in itertools.product(*[v for _, v in grid]):
        assignment = dict(zip(fields, values, strict=True))
        workdir = os.path.join(sweep_dir, run_name(assignment))
        command = common.train_command(config, workdir, assignment)
        out.append((workdir, [sys.executable, *command[1:], *extra]))
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def aggregate(directory: str) -> list[dict]:
    """Writes results.md/.csv/.png in ``directory`` and returns the rows."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "**", "results.json"), recursive=True)):
        with open(path) as f:
            result = json.load(f)
        config = _flatten(result.get("config", {}))
        rows.append({"run": os.path.relpath(os.path.dirname(path), directory), **result, **config})
    if not rows:
        raise SystemExit(f"no results.json under {directory}")
    config_keys = sorted({k for r in rows for k in _flatten(r.get("config", {}))})
    varying = [k for k in config_keys if len({json.dumps(r.get(k)) for r in rows}) > 1]
    header = ["run", *varying, *COLUMNS]
    with open(os.path.join(directory, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[r.get(k) for k in header] for r in rows])

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in header) + " |" for r in rows]
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [
        ", ".join(f"{k.split('.')[-1]}={r.get(k)}" for k in varying) or r["run"] for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [100 * r["test_error"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_title(os.path.basename(os.path.normpath(directory)))
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "results.png"), dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="config file (with optional :arg string)")
    parser.add_argument("--sweep_dir", help="one workdir per run is created under it")
    parser.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,...")
    parser.add_argument("--print_commands", action="store_true", help="print, do not run")
    parser.add_argument("--aggregate", metavar="DIR", help="collect results.json under DIR")
    args, extra = parser.parse_known_args(argv)
    if args.aggregate:
        aggregate(args.aggregate)
        return
    if not args.config or not args.sweep_dir:
        parser.error("--config and --sweep_dir are required (or --aggregate DIR)")
    runs = commands(args.config, args.sweep_dir, parse_grid(args.grid), extra)
    if args.print_commands:
        for _, argv_ in runs:
            print(shlex.join(argv_))
        return
    failed = []
    for i, (workdir, argv_) in enumerate(runs):
        if os.path.exists(os.path.join(workdir, "results.json")):
            print(f"[{i + 1}/{len(runs)}] done already: {workdir}")
            continue
        print(f"[{i + 1}/{len(runs)}] {shlex.join(argv_)} (log: {workdir}/log.txt)", flush=True)
        try:
            common.run_training(argv_, workdir)
        except RuntimeError as error:
            print(error, flush=True)
            failed.append(workdir)
    aggregate(args.sweep_dir)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")


if __name__ == "__main__":
    main()
