"""Regime study: constant vs stochastic depth on a CIFAR-10 training subset, test error vs budget.

A deep CIFAR ResNet (default ResNet-56) trained on the first `--train_size` CIFAR-10 training
images (`input.train_split=train[:N]`) with `configs/cifar10_sd.py`'s recipe (SGD Nesterov,
lr 0.1, /10 at 50% and 75% of the run, batch 128, pad-4 crops + flips), the step schedule
compressed to each training budget (`--budgets`, in epochs), constant depth vs stochastic depth
(linear to 0.5, batch mode), `--seeds` seeds per point. Test error on the full 10,000-image test
set after the last epoch. Small data + deep network: the regime in which the paper's regulariser
should pay first.

Runs go budget-major (every budget's seeds and variants before the next budget), each one
`python -m sdjax.main ...` in its own workdir; an interrupted run resumes from its checkpoint. A
finished run leaves a record under `experiments/results/fidelity_regime/runs/` (committed: a
later session reuses it instead of retraining). `--shard K/N` gives one of N processes its part
of the plan; `--aggregate_only` writes the table and figure from the records (listing the runs
still missing) without training anything. The study as run (one process per core):

    for k in 0 1; do TF_CPP_MIN_LOG_LEVEL=2 nohup taskset -c $k python -m \
        experiments.fidelity_regime --depth 20 --train_size 1024 --budgets 20 40 80 --seeds 3 \
        --data_dir ../shared/data/tfds --shard $k/2 > regime_$k.log 2>&1 & done
    python -m experiments.fidelity_regime --aggregate_only ...   # same arguments, no --shard

Outputs: `experiments/results/fidelity_regime/` (`results.json`, `results.md`,
`fidelity_regime.png`); workdirs under `workdirs/fidelity_regime/`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import time
from collections.abc import Sequence
from typing import Any

from experiments import common, fidelity_stats

NAME = "fidelity_regime"
CONFIG = "configs/cifar10_sd.py"
VARIANTS = ("constant", "sd")


def overrides(args: argparse.Namespace, variant: str, budget: int, seed: int) -> dict[str, Any]:
    """Config overrides of one run (dotted paths)."""
    out = {
        "model.name": f"cifar_resnet{args.depth}",
        "model.final_drop_rate": {"constant": 0.0, "sd": args.rate}[variant],
        "model.drop_schedule": "linear",
        "model.drop_mode": "batch",
        "input.train_split": f"train[:{args.train_size}]",
        "train.num_epochs": budget,
        "train.eval_every_epochs": budget,
        "train.checkpoint_every_steps": args.checkpoint_every_steps,
        "train.progress_bar": False,
        "seed": seed,
    }
    if args.data_dir:
        out["input.data_dir"] = args.data_dir
    return out


def plan(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(budget, seed, variant) in run order: budget-major, then seed, then variant."""
    return [(b, s, v) for b in args.budgets for s in range(args.seeds) for v in args.variants]


def in_shard(args: argparse.Namespace, index: int) -> bool:
    """Whether plan entry `index` is this process's: (budget, seed) groups dealt round-robin.

    `--shard K/N` lets N processes (one per core) share a plan; every variant of one
    (budget, seed) stays in one process, so each process trains constant and SD alike.
    """
    k, n = args.shard
    return (index // len(args.variants)) % n == k


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard={text!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard={text!r}: need 0 <= K < N")
    return k, n


def tag_of(args: argparse.Namespace) -> str:
    return f"resnet{args.depth}_n{args.train_size}_rate{args.rate}"


def workdir_of(root: pathlib.Path, args: argparse.Namespace, budget: int, seed: int, variant: str):
    return root / tag_of(args) / f"ep{budget}" / f"{variant}_seed{seed}"


def run_record_of(out_dir: pathlib.Path, args, budget: int, seed: int, variant: str):
    """Where one finished run's record is kept (committed, so a later session reuses it)."""
    return out_dir / "runs" / tag_of(args) / f"ep{budget}" / f"{variant}_seed{seed}.json"


def summarize(runs: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per budget: per-variant mean/std/t-interval and the SD-minus-constant Welch gap.

    Works on partial results: a variant with one run has `nan` spread, a gap needs >= 2 runs of
    each variant (else `None`).
    """
    groups = fidelity_stats.group_runs(runs, ("budget", "variant"))
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        row: dict[str, Any] = {"budget": budget}
        errs = {}
        for variant in VARIANTS:
            group = groups.get((budget, variant), [])
            errs[variant] = [r["test_error"] for r in group]
            row[variant] = fidelity_stats.mean_ci(errs[variant], confidence) if group else None
            losses = [r["final_train_loss"] for r in group if r.get("final_train_loss") is not None]
            row[f"{variant}_train_loss"] = sum(losses) / len(losses) if losses else None
        ok = len(errs["constant"]) >= 2 and len(errs["sd"]) >= 2
        row["gap_welch"] = (
            fidelity_stats.welch_diff_interval(errs["sd"], errs["constant"], confidence)
            if ok
            else None
        )
        rows.append(row)
    return rows


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        cells = [r["budget"]]
        for v in VARIANTS:
            m = r[v]
            cells.append(
                "n/a" if m is None else f"{_pct(m['mean'])} ± {_pct(m['half_width'])} (n={m['n']})"
            )
            loss = r[f"{v}_train_loss"]
            cells.append("n/a" if loss is None else f"{loss:.4f}")
        g = r["gap_welch"]
        cells.append(
            "n/a" if g is None else f"{_pct(g['diff'])} [{_pct(g['low'])}, {_pct(g['high'])}]"
        )
        body.append(cells)
    return common.markdown_table(
        [
            "budget (epochs)",
            "constant test error (%) mean ± 95% t",
            "constant final train loss",
            "SD test error (%) mean ± 95% t",
            "SD final train loss",
            "gap SD - constant (pp) [95% Welch]",
        ],
        body,
    )


def plot(path: pathlib.Path, runs: Sequence[dict[str, Any]], rows, title: str) -> None:
    """Test error vs budget: seeds as dots, means with 95% t intervals (std if n < 2: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"constant": "tab:blue", "sd": "tab:orange"}
    labels = {"constant": "constant depth", "sd": "stochastic depth (linear to 0.5)"}
    for i, variant in enumerate(VARIANTS):
        shift = (i - 0.5) * 0.03
        pts = [(r["budget"], r["test_error"]) for r in runs if r["variant"] == variant]
        if pts:
            ax.scatter(
                [b * (1 + shift) for b, _ in pts],
                [100 * e for _, e in pts],
                s=10,
                color=colors[variant],
                alpha=0.4,
            )
        xs, ys, es = [], [], []
        for r in rows:
            m = r[variant]
            if m is None:
                continue
            xs.append(r["budget"] * (1 + shift))
            ys.append(100 * m["mean"])
            es.append(0.0 if m["half_width"] != m["half_width"] else 100 * m["half_width"])
        if xs:
            ax.errorbar(
                xs, ys, yerr=es, fmt="o-", capsize=4, color=colors[variant], label=labels[variant]
            )
    ax.set_xscale("log")
    budgets = sorted({r["budget"] for r in rows})
    if budgets:
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xticks([], minor=True)
    ax.set_xlabel("training budget (epochs, step schedule compressed to the budget)")
    ax.set_ylabel("test error (%), 10,000 CIFAR-10 test images")
    ax.grid(alpha=0.3)
    ax.legend()
    common.save_figure(fig, path, title)


def _without_workdir(argv: Sequence[str]) -> list[str]:
    """A run's command line minus its workdir (records stay valid under another root)."""
    return [a for a in argv if not a.startswith("--workdir=")]


def collect(args, root: pathlib.Path, run_missing: bool):
    """Finished runs (from their committed records) and, if `run_missing`, this shard's others.

    A run whose record exists is read, not retrained, when its command is the planned one. The
    rest are trained in plan order (resuming from the workdir's checkpoint) or listed as pending.
    """
    out_dir = common.results_dir(NAME, args.out)
    runs, pending = [], []
    start = time.time()
    for index, (budget, seed, variant) in enumerate(plan(args)):
        workdir = workdir_of(root, args, budget, seed, variant)
        record_path = run_record_of(out_dir, args, budget, seed, variant)
        command = common.train_command(CONFIG, workdir, overrides(args, variant, budget, seed))
        if record_path.exists():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if _without_workdir(shlex.split(record["command"])) == _without_workdir(command):
                runs.append(record)
                continue
        if not (run_missing and in_shard(args, index)):
            progress = None
            metrics = workdir / "metrics.jsonl"
            if metrics.exists():
                steps = [r.get("step", 0) for r in common.read_jsonl(metrics)]
                progress = max(steps) if steps else 0
            pending.append(
                {
                    "budget": budget,
                    "seed": seed,
                    "variant": variant,
                    "last_logged_step": progress,
                    "command": " ".join(command),
                }
            )
            continue
        res = common.run_training(command, workdir)
        curves = common.epoch_curves(common.read_jsonl(workdir / "metrics.jsonl"))
        record = {
            "budget": budget,
            "seed": seed,
            "variant": variant,
            "test_error": res["test_error"],
            "final_train_loss": res.get("final_train_loss"),
            "train_time_s": res["train_time_s"],
            "epoch_time_s": common.steady_epoch_time(curves["epoch_time_s"]),
            "train_loss_per_epoch": curves["train_loss"],
            "steps": res.get("steps"),
            "command": res["command"],
        }
        common.write_json(record_path, record)
        runs.append(record)
        print(
            f"[{time.time() - start:7.0f} s] ep{budget} {variant:8s} seed {seed}: "
            f"test error {100 * res['test_error']:.2f}%, train loss "
            f"{res.get('final_train_loss')}, {res['train_time_s']:.0f} s",
            flush=True,
        )
    return runs, pending


def write_outputs(args, runs, pending, partial: bool) -> dict[str, Any]:
    out_dir = common.results_dir(NAME, args.out)
    rows = summarize(runs)
    prov = common.provenance()
    prov["machine"]["isa"] = fidelity_stats.cpu_isa()
    status = (
        "PARTIAL: not every planned run has finished"
        if partial or pending
        else "complete: every planned run finished"
    )
    title = f"ResNet-{args.depth}, CIFAR-10 train[:{args.train_size}], test error vs budget"
    results = {
        "experiment": "fidelity regime study: CIFAR-10 subset, constant vs stochastic depth",
        "status": status,
        "args": {k: v for k, v in vars(args).items()},
        "config": CONFIG,
        "summary": rows,
        "runs": runs,
        "pending": pending,
        "provenance": prov,
    }
    common.write_json(out_dir / "results.json", results)
    if runs:
        plot(out_dir / f"{NAME}.png", runs, rows, title)
    pend = "".join(
        f"- ep{p['budget']} {p['variant']} seed {p['seed']}: "
        + ("not started" if p["last_logged_step"] is None else f"at step {p['last_logged_step']}")
        + "\n"
        for p in pending
    )
    md = (
        f"# Regime study: constant vs stochastic depth on a CIFAR-10 subset\n\n**Status: {status}.**"
        f"\n\n{title}. Config `{CONFIG}` with `input.train_split=train[:{args.train_size}]`, the "
        "step schedule (/10 at 50% and 75%) compressed to each budget, batch 128, pad-4 crops + "
        "flips; stochastic depth linear to "
        f"{args.rate}, batch mode. Test error on the 10,000 test images after the last epoch; "
        "mean ± half-width of the 95% t interval over seeds; gap = SD - constant with a 95% Welch "
        "t interval. Paper (full CIFAR-10, ResNet-110, 500 epochs): 6.41% constant, 5.25% SD.\n\n"
        + table(rows)
        + (f"\n![test error vs budget]({NAME}.png)\n" if runs else "")
        + ("\n## Pending runs\n\n" + pend if pend else "")
        + "\n## Provenance\n\n"
        + common.provenance_markdown(prov)
        + f"- ISA flags: {prov['machine']['isa']}; each process pinned to one core (`taskset`), the plan split across processes with `--shard`; times of runs that overlapped other work are not comparable\n"
    )
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--train_size", type=int, default=5000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[15, 30, 60])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--checkpoint_every_steps", type=int, default=200)
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="K/N: train 1/N of the plan"
    )
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument("--workdir_root", default=None)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    root = pathlib.Path(args.workdir_root or common.REPO_ROOT / "workdirs" / NAME)
    runs, pending = collect(args, root, run_missing=not args.aggregate_only)
    results = write_outputs(args, runs, pending, partial=bool(pending))
    print(json.dumps(results["summary"], indent=1))
    return results


if __name__ == "__main__":
    main()
