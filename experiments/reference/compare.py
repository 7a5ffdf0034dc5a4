"""Fidelity check: the stochastic-depth test-error gap in sdjax vs an independent PyTorch reference.

Both frameworks train the same network (CIFAR ResNet, digits, `configs/digits_sd.py`'s recipe;
the PyTorch side is `experiments.reference.train_torch`) constant depth (`final_drop_rate=0`) and
with stochastic depth (linear to 0.5, batch mode), on the same seeds. Within a framework the
design is paired: the constant and SD runs of one seed share their initial weights and data
order, so the SD-minus-constant gap is the mean of the per-seed differences with
a 95% t interval on n - 1 df (`stats.paired_diff_interval`). Between frameworks it is not (each
draws its own initial weights, augmentation and gates), so the difference of the two gaps gets a
t interval from the two gaps' standard errors with Satterthwaite df
(`stats.difference_of_differences`). All seeds are reported; none is excluded.

Runs are seed-major and resumable: sdjax runs reuse `workdirs/fidelity_reference/sdjax/...`
(`results.json`), PyTorch runs reuse `workdirs/fidelity_reference/torch/<variant>_seed<s>.json`.
`--aggregate_only` writes the tables from whatever runs have finished; a run whose workdir is
gone is read from the committed `results.json` (its `runs`, whose original provenance is kept
as `runs_provenance`), so the committed tables regenerate without training:

    python -m experiments.reference.compare --depth 32 --epochs 15 --seeds 10 --aggregate_only

    OMP_NUM_THREADS=1 taskset -c 1 python -m experiments.reference.compare --depth 32 \\
        --epochs 15 --seeds 10

Outputs: `experiments/reference/results/` (`results.json`, `results.md`).

CIFAR-10 mode (`--dataset cifar10`): ResNet-`depth` on the first `--train_size` CIFAR-10 training
images with sdjax's earlier recipe (`configs/cifar10_sd.py:recipe=sdjax`, the regime study's
`CONFIG`), tested on the 10,000 test images -- the runs of the regime study
(`experiments.regime.run`). The sdjax side is NOT retrained: it reads the
regime study's committed record of each run,
`experiments/regime/results/runs/resnet<D>_n<N>_rate0.5/ep<E>/<variant>_seed<s>.json`,
when its command is the planned one up to `--workdir`, the fields sdjax itself calls harmless
(`input.data_dir`, checkpoint cadence, ...) and the config flag's spelling (a record made with
`--config=configs/cifar10_sd.py` before that config defaulted to the paper's recipe was made
with the sdjax recipe; `experiments.regime.run.normalize_config`); a missing record is listed as pending
(`--train_missing_sdjax` trains it under `workdirs/fidelity_reference/sdjax/`). The PyTorch runs
(`train_torch --dataset cifar10`) leave committed records in
`experiments/reference/results/cifar10/resnet<D>_n<N>_ep<E>/torch_runs/<variant>_seed<s>.json`
(reused by later calls) and logs in `workdirs/fidelity_reference/torch/cifar10_.../`.
The output has its own folder; the digits results stay untouched:

    OMP_NUM_THREADS=1 taskset -c 1 python -m experiments.reference.compare --dataset cifar10 \\
        --depth 20 --train_size 1024 --epochs 20 --seeds 2 --data_dir ../shared/data/tfds

Outputs: `experiments/reference/results/cifar10/resnet<depth>_n<N>_ep<epochs>/`
(`results.json`, `results.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import time
from collections.abc import Sequence
from typing import Any

from experiments import common
from experiments.common import stats
from experiments.regime import run as regime

NAME = "fidelity_reference"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
CONFIG = "configs/digits_sd.py"
CIFAR_CONFIG = regime.CONFIG  # configs/cifar10_sd.py:recipe=sdjax, the records' recipe
SD_RATE = 0.5
VARIANTS = ("constant", "sd")
FRAMEWORKS = ("sdjax", "torch")
ANALYSIS = (
    "Gap = SD - constant in percentage points, **paired analysis** within each framework: the "
    "constant and SD runs of one seed share initial weights and data order, "
    "so the gap is the mean of the per-seed differences with a 95% t interval on n - 1 df "
    "(n = seeds with both runs). The two frameworks are not paired (each has its own random "
    "streams): the difference of their gaps is a Welch-type t interval (Satterthwaite df). "
    "All seeds are reported; none is excluded."
)


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


def torch_command(
    variant: str,
    seed: int,
    depth: int,
    epochs: int,
    out: pathlib.Path,
    dataset: str = "digits",
    train_size: int | None = None,
    data_dir: str | None = None,
) -> list:
    command = [
        "python",
        "-m",
        "experiments.reference.train_torch",
        f"--variant={variant}",
        f"--seed={seed}",
        f"--depth={depth}",
        f"--epochs={epochs}",
        f"--out={out}",
    ]
    if dataset != "digits":
        command.append(f"--dataset={dataset}")
        if train_size is not None:
            command.append(f"--train_size={train_size}")
        if data_dir:
            command.append(f"--data_dir={data_dir}")
    return command


def run_torch(
    command: Sequence[str], result_path: pathlib.Path, log_path: pathlib.Path | None = None
) -> dict[str, Any]:
    """Runs a `torch_command` (one thread) unless `result_path` exists; its output goes to
    `log_path` (default `<result>.log`). See `common.run_training`."""
    log_path = log_path or result_path.with_suffix(".log")
    return common.run_training(
        command,
        result_path.parent,
        env={"OMP_NUM_THREADS": "1"},
        result_path=result_path,
        log_path=log_path,
    )


def gap_rows(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per framework: mean test errors and the SD-minus-constant gap, paired by seed.

    `gap` is `stats.paired_diff_interval` (per-seed differences, t interval on n - 1 df; the
    runs of one seed share initial weights and data order); `None` with fewer than 2 seeds
    that have both variants.
    """
    groups = stats.group_runs(runs, ("framework", "variant"))
    rows = []
    for fw in dict.fromkeys(r["framework"] for r in runs):
        const = [r["test_error"] for r in groups.get((fw, "constant"), [])]
        sd = [r["test_error"] for r in groups.get((fw, "sd"), [])]
        row: dict[str, Any] = {
            "framework": fw,
            "n_constant": len(const),
            "n_sd": len(sd),
            "constant": stats.mean_ci(const, confidence) if const else None,
            "sd": stats.mean_ci(sd, confidence) if sd else None,
            "gap": stats.paired_diff_interval(
                [*groups.get((fw, "constant"), []), *groups.get((fw, "sd"), [])],
                "test_error",
                "sd",
                "constant",
                confidence,
            ),
        }
        rows.append(row)
    return rows


def gap_difference(rows: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict | None:
    """sdjax gap minus torch gap: a t interval from the two gaps' SEs, Satterthwaite df.

    The frameworks are not paired (different random streams), so the two paired gaps are
    independent estimates: `se^2 = se_a^2 + se_b^2` and `df = se^4 / (se_a^4 / df_a +
    se_b^4 / df_b)` (each gap's own n - 1 df), so that with few seeds the interval widens as the
    gaps' intervals do.
    """
    by = {r["framework"]: r for r in rows}
    if not all(fw in by and by[fw]["gap"] for fw in FRAMEWORKS):
        return None
    return stats.difference_of_differences(by["sdjax"]["gap"], by["torch"]["gap"], confidence)


def gap_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        c, s, g = r["constant"], r["sd"], r["gap"]
        body.append(
            [
                r["framework"],
                f"{r['n_constant']} / {r['n_sd']}",
                f"{common.pct(c['mean'])} ± {common.pct(c['std'])}" if c else "n/a",
                f"{common.pct(s['mean'])} ± {common.pct(s['std'])}" if s else "n/a",
                f"{common.pct(g['diff'])} [{common.pct(g['low'])}, {common.pct(g['high'])}] "
                f"(n={g['n']})"
                if g
                else "n/a",
            ]
        )
    return common.markdown_table(
        [
            "framework",
            "runs (constant / SD)",
            "constant test error (%) mean ± std",
            "SD test error (%) mean ± std",
            "gap SD - constant (pp) [95% paired t]",
        ],
        body,
    )


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    body = [
        [
            r["framework"],
            r["variant"],
            r["seed"],
            common.pct(r["test_error"]),
            f"{r['final_train_loss']:.4f}" if r.get("final_train_loss") is not None else "n/a",
            f"{r['train_time_s']:.1f}",
        ]
        for r in sorted(runs, key=lambda r: (r["framework"], r["variant"], r["seed"]))
    ]
    return common.markdown_table(
        ["framework", "variant", "seed", "test error (%)", "final train loss", "train time (s)"],
        body,
    )


def committed_runs(out_dir: pathlib.Path) -> tuple[dict[tuple, dict[str, Any]], dict | None]:
    """The runs of the committed `out_dir/results.json` by (framework, variant, seed), and the
    provenance of the call that recorded them (`runs_provenance`, else `provenance`)."""
    path = out_dir / "results.json"
    if not path.exists():
        return {}, None
    saved = json.loads(path.read_text(encoding="utf-8"))
    runs = {(r["framework"], r["variant"], r["seed"]): r for r in saved.get("runs", [])}
    return runs, saved.get("runs_provenance", saved.get("provenance"))


def collect(
    args, workdir_root: pathlib.Path, run_missing: bool, committed: dict[tuple, dict] | None = None
) -> list[dict[str, Any]]:
    """Digits runs, seed-major: each trained (or reused from its workdir); with `run_missing`
    False, a run without a workdir result is taken from `committed` (`committed_runs`) if there."""
    committed = committed or {}
    runs = []
    start = time.time()
    tag = f"depth{args.depth}_ep{args.epochs}"
    for seed in range(args.seeds):
        for variant in VARIANTS:
            for fw in FRAMEWORKS:
                if fw == "sdjax":
                    workdir = workdir_root / "sdjax" / tag / f"{variant}_seed{seed}"
                    if not run_missing and not (workdir / "results.json").exists():
                        if (fw, variant, seed) in committed:
                            runs.append(committed[fw, variant, seed])
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
                        if (fw, variant, seed) in committed:
                            runs.append(committed[fw, variant, seed])
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


# ---------------------------------------------------------------------------------------------
# CIFAR-10 mode: sdjax from the regime study's committed records, torch trained here


def cifar_tag(args) -> str:
    return f"resnet{args.depth}_n{args.train_size}_ep{args.epochs}"


def regime_args(args) -> argparse.Namespace:
    """The `experiments.regime.run` arguments whose runs this comparison mirrors."""
    return argparse.Namespace(
        depth=args.depth,
        train_size=args.train_size,
        rate=SD_RATE,
        data_dir=args.data_dir,
        checkpoint_every_steps=200,
    )


def sdjax_cifar_command(args, variant: str, seed: int, workdir: pathlib.Path) -> list[str]:
    """The planned sdjax run: the regime study's command for (variant, epochs, seed)."""
    overrides = regime.overrides(regime_args(args), variant, args.epochs, seed)
    return common.train_command(CIFAR_CONFIG, workdir, overrides)


def sdjax_record_path(args, variant: str, seed: int) -> pathlib.Path:
    root = pathlib.Path(args.sdjax_records or regime.RESULTS_DIR)
    return regime.run_record_of(root, regime_args(args), args.epochs, seed, variant)


def trajectory_flags(argv: Sequence[str]) -> list[str]:
    """A `python -m sdjax.main` command line minus `--workdir` and the flags of the fields sdjax
    calls harmless (`sdjax.config.HARMLESS_FIELDS`: data dir, checkpoint cadence, ...)."""
    from sdjax.config import HARMLESS_FIELDS

    skip = ("--workdir=", *(f"--config.{f}=" for f in HARMLESS_FIELDS))
    # `--config=configs/cifar10_sd.py` (a record made before the paper's recipe became that
    # config's default) reads as `configs/cifar10_sd.py:recipe=sdjax`, the recipe it ran.
    return [a for a in regime.normalize_config(argv) if not a.startswith(skip)]


def same_sdjax_run(a: str | Sequence[str], b: str | Sequence[str]) -> bool:
    """Whether two sdjax command lines (strings or argv lists) train the same trajectory."""
    a = shlex.split(a) if isinstance(a, str) else list(a)
    b = shlex.split(b) if isinstance(b, str) else list(b)
    return trajectory_flags(a) == trajectory_flags(b)


def sdjax_cifar_run(args, variant, seed, workdir_root, train_missing) -> dict[str, Any] | None:
    """The sdjax result of one CIFAR-10 run: its regime-study record when the command matches,
    else (`train_missing`) a run trained under `workdir_root/sdjax/`, else None."""
    workdir = workdir_root / "sdjax" / f"cifar10_{cifar_tag(args)}" / f"{variant}_seed{seed}"
    command = sdjax_cifar_command(args, variant, seed, workdir)
    path = sdjax_record_path(args, variant, seed)
    keys = ("test_error", "final_train_loss", "train_time_s", "steps", "command")
    if path.exists():
        record = json.loads(path.read_text(encoding="utf-8"))
        if same_sdjax_run(record["command"], command):
            try:
                source = str(path.relative_to(common.REPO_ROOT))
            except ValueError:
                source = str(path)
            return {**{k: record.get(k) for k in keys}, "reused": True, "record": source}
    if not (train_missing or (workdir / "results.json").exists()):
        return None
    res = common.run_training(command, workdir)
    return {k: res.get(k) for k in (*keys, "reused")}


def collect_cifar(args, workdir_root: pathlib.Path, out_dir: pathlib.Path, run_missing: bool):
    """(runs, pending): sdjax from records (see the module docstring), torch run if missing.

    The torch results are committed records in `out_dir/torch_runs/` (reused, never retrained);
    their logs go to `workdir_root/torch/`.
    """
    runs, pending = [], []
    start = time.time()
    out = out_dir / "torch_runs"
    logs = workdir_root / "torch" / f"cifar10_{cifar_tag(args)}"
    for seed in range(args.seeds):
        for variant in VARIANTS:
            res = sdjax_cifar_run(
                args, variant, seed, workdir_root, run_missing and args.train_missing_sdjax
            )
            if res is None:
                pending.append({"framework": "sdjax", "variant": variant, "seed": seed})
            else:
                runs.append({"framework": "sdjax", "variant": variant, "seed": seed, **res})
            path = out / f"{variant}_seed{seed}.json"
            if not run_missing and not path.exists():
                pending.append({"framework": "torch", "variant": variant, "seed": seed})
                continue
            command = torch_command(
                variant, seed, args.depth, args.epochs, out, "cifar10", args.train_size,
                args.data_dir,
            )  # fmt: skip
            res = run_torch(command, path, logs / f"{variant}_seed{seed}.log")
            res.pop("framework", None)
            runs.append({"framework": "torch", **res})
            if run_missing:
                print(
                    f"[{time.time() - start:6.0f} s] torch {variant:8s} seed {seed}: test error "
                    f"{100 * res['test_error']:.2f}%, {res['train_time_s']:.0f} s",
                    flush=True,
                )
    return runs, pending


def report_markdown(title: str, design: str, rows, diff_line: str, runs, pending=()) -> str:
    """The report: title, a PARTIAL status while runs are pending, the design sentence, the
    analysis, the gap table, the difference of the gaps and the per-run table."""
    pend = "".join(f"- {p['framework']} {p['variant']} seed {p['seed']}\n" for p in pending)
    return (
        f"# Fidelity: sdjax vs an independent PyTorch reference ({title})\n\n"
        + ("**Status: PARTIAL: some planned runs are missing (below).**\n\n" if pending else "")
        + design
        + ANALYSIS
        + "\n\n"
        + gap_table(rows)
        + "\n"
        + diff_line
        + "## Runs\n\n"
        + runs_table(runs)
        + ("\n## Pending runs\n\n" + pend if pend else "")
    )


def cifar_design(args) -> str:
    return (
        f"ResNet-{args.depth}, CIFAR-10 `train[:{args.train_size}]`, {args.epochs} epochs, "
        f"recipe of `{CIFAR_CONFIG}`, sdjax's earlier recipe (SGD Nesterov 0.9, weight decay 1e-4 on all parameters, "
        "lr 0.1 without warm-up, /10 at 50% and 75%, batch 128 with the remainder dropped, pad-4 "
        "crops + flips); constant depth vs stochastic depth linear to 0.5, batch mode, eval-time "
        "scaling by the survival probability. Test error on the 10,000 test images after the "
        "last epoch. sdjax runs: the regime study's committed records "
        "(`experiments/regime/results/runs/`); PyTorch runs: `python -m experiments."
        "reference.train_torch --dataset cifar10` (same data, normalisation and per-epoch example "
        "order; its own random draws for initialisation, augmentation and gates). "
    )


def digits_design(args) -> str:
    return (
        f"ResNet-{args.depth}, {args.epochs} epochs, recipe of `{CONFIG}` (SGD Nesterov 0.9, "
        "weight decay 1e-4 on all parameters, lr 0.1, 1-epoch linear warm-up, /10 at 50% and "
        "75%, batch 64, pad-1 crops); constant depth vs stochastic depth linear to 0.5, batch "
        "mode, eval-time scaling by the survival probability. Test error on the 360-image "
        "digits test split after the last epoch. "
    )


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--train_size", type=int, default=1024, help="cifar10: train[:N]")
    parser.add_argument(
        "--data_dir",
        default=os.environ.get("TFDS_DATA_DIR"),
        help="cifar10: tfds data dir (default $TFDS_DATA_DIR)",
    )
    parser.add_argument(
        "--train_missing_sdjax",
        action="store_true",
        help="cifar10: train sdjax runs without a matching regime-study record",
    )
    parser.add_argument(
        "--sdjax_records",
        default=None,
        help="cifar10: folder of the regime study's records (default its results folder)",
    )
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument("--workdir_root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    workdir_root = pathlib.Path(args.workdir_root or common.REPO_ROOT / "workdirs" / NAME)
    cifar = args.dataset == "cifar10"
    runs_prov = None
    if cifar:
        out_dir = common.results_dir(RESULTS_DIR / "cifar10" / cifar_tag(args), args.out)
        runs, pending = collect_cifar(
            args, workdir_root, out_dir, run_missing=not args.aggregate_only
        )
    else:
        out_dir = common.results_dir(RESULTS_DIR, args.out)
        committed, runs_prov = committed_runs(out_dir)
        runs = collect(args, workdir_root, not args.aggregate_only, committed)
        pending = []
        if not any(r in committed.values() for r in runs):
            runs_prov = None
    rows = gap_rows(runs)
    diff = gap_difference(rows)
    prov = common.provenance()
    extra = ("tensorflow-datasets",) if cifar else ()
    prov["versions"].update(common.versions(("torch", "scikit-learn", "scipy", *extra)))
    results = {
        "experiment": (
            "fidelity: sdjax vs PyTorch reference, SD-minus-constant gap on a CIFAR-10 subset"
            if cifar
            else "fidelity: sdjax vs PyTorch reference, SD-minus-constant gap on digits"
        ),
        "args": vars(args),
        "config": CIFAR_CONFIG if cifar else CONFIG,
        "gaps": rows,
        "gap_difference_sdjax_minus_torch": diff,
        "runs": runs,
        "provenance": prov,
    }
    if cifar:
        results["pending"] = pending
    elif runs_prov is not None:  # runs read from the committed results.json: how they were made
        results["runs_provenance"] = runs_prov
    diff_line = (
        f"Difference of the gaps (sdjax - torch): {common.pct(diff['diff'])} pp, 95% interval "
        f"[{common.pct(diff['low'])}, {common.pct(diff['high'])}] (unpaired between frameworks: t "
        f"interval from the two paired gaps' standard errors, Satterthwaite df {diff['df']:.1f})."
        "\n\n"
        if diff
        else ""
    )
    if cifar:
        md = report_markdown("CIFAR-10 subset", cifar_design(args), rows, diff_line, runs, pending)
        note = (
            "- PyTorch runs with 1 thread (`OMP_NUM_THREADS=1`); times of runs that overlapped "
            "other work are not comparable\n"
        )
    else:
        md = report_markdown("digits", digits_design(args), rows, diff_line, runs)
        note = "- Runs pinned to one core (`taskset -c 1`, torch with 1 thread)\n"
        if runs_prov is not None:
            note += (
                f"- The runs were recorded by `{runs_prov['command']}` ({runs_prov['date_utc']}, "
                f"git commit `{runs_prov['git_commit']}`; `results.json`: `runs_provenance`); "
                "this table is regenerated from them by the command above, nothing retrained\n"
            )
    md = common.write_report(out_dir, results, md, note)
    print(md)
    return results


if __name__ == "__main__":
    main()
