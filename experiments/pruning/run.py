"""Pruning blocks at inference: test error against the number of residual blocks removed.

Question: does a network trained with stochastic depth lose less accuracy than one trained with
constant depth when residual blocks are removed at test time (Huang et al. 2016, section 5;
Veit et al. 2016)? Design: ResNet-32 on digits (`configs/digits_sd.py`, 20 epochs), arms
`constant` (`final_drop_rate=0`) and `sd` (the config's linear decay to 0.5, batch mode), paired
by seed (same initial weights and data order). Each trained network is evaluated on the 360
test images with the first `k` blocks of a removal order removed (branch skipped, shortcut kept;
`sdjax.models.prune.pruned_apply`), for `k` in `--removed`; orders: `lowest_survival` (the
deepest blocks first: the SD schedule's lowest survival probabilities) and `random` (one seeded
permutation per seed, the same for both arms). The gap SD minus constant at each `k` is paired by
seed, 95% t interval with n - 1 df.

    python -m experiments.pruning.run --seeds 0 1 2
    python -m experiments.pruning.run --seeds 0 1 2 --aggregate_only   # tables from the records

Outputs: `experiments/pruning/results/` (`results.json`, `results.md`, `pruning.png`); the
trained runs' workdirs under `workdirs/pruning/` (not committed); their records are in
`results.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
from typing import Any

import numpy as np

from experiments import common
from experiments.common import stats

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = "configs/digits_sd.py"
ARMS = {"constant": 0.0, "sd": 0.5}
ORDERS = ("lowest_survival", "random")


def _overrides(arm: str, seed: int) -> dict[str, Any]:
    return {"seed": seed, "model.final_drop_rate": ARMS[arm], "train.tensorboard": False}


def _config(arm: str, seed: int):
    spec = importlib.util.spec_from_file_location("digits_sd", common.REPO_ROOT / CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(_overrides(arm, seed))
    return config


def evaluate_pruned(workdir: pathlib.Path, arm: str, seed: int, removed: list[int]) -> dict:
    """Test error (%) of the trained run in `workdir` per removal order and count."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from sdjax import trainer as trainer_lib  # noqa: PLC0415
    from sdjax.data import augment  # noqa: PLC0415
    from sdjax.models import prune  # noqa: PLC0415

    trainer = trainer_lib.build(_config(arm, seed), str(workdir))  # restores the last step
    variables = {"params": trainer.state.params, "batch_stats": trainer.state.batch_stats}
    images, labels = trainer.data.test
    x = augment.normalize(images, trainer.data.mean, trainer.data.std)
    orders = {
        "lowest_survival": prune.removal_order(trainer.model),
        "random": prune.removal_order(trainer.model, seed=1000 + seed),
    }
    errors: dict[str, dict[int, float]] = {}
    for name, order in orders.items():
        errors[name] = {}
        for k in removed:
            apply = jax.jit(prune.pruned_apply(trainer.model, order[:k]))
            predicted = np.asarray(apply(variables, x)).argmax(-1)
            errors[name][k] = float(100 * np.mean(predicted != labels))
    trainer.checkpointer.close()
    return {"orders": {k: [int(b) for b in v] for k, v in orders.items()}, "errors": errors}


def analyse(runs: list[dict[str, Any]], removed: list[int]) -> dict[str, Any]:
    """Per order and k: mean error per arm and the paired SD-minus-constant gap."""
    table = {}
    for order in ORDERS:
        rows = []
        for k in removed:
            per_arm = {
                arm: {r["seed"]: r["errors"][order][str(k)] for r in runs if r["variant"] == arm}
                for arm in ARMS
            }
            seeds = sorted(set(per_arm["constant"]) & set(per_arm["sd"]))
            row: dict[str, Any] = {"removed": k, "n": len(seeds)}
            for arm in ARMS:
                row[arm] = float(np.mean([per_arm[arm][s] for s in seeds])) if seeds else None
            diffs = [per_arm["sd"][s] - per_arm["constant"][s] for s in seeds]
            if len(diffs) >= 2:
                ci = stats.mean_ci(diffs)
                low, high = stats.ci_bounds(ci)
                row.update(gap=ci["mean"], low=low, high=high)
            rows.append(row)
        table[order] = rows
    return table


def to_markdown(table: dict[str, Any], num_blocks: int, seeds: list[int]) -> str:
    lines = [
        "# Pruning blocks at inference: SD-trained vs constant-trained ResNet-32 (digits)",
        "",
        f"Test error (%) on the 360 digits test images with k of the {num_blocks} residual "
        f"blocks removed; mean over seeds {seeds}. Gap = SD minus constant, paired by seed, "
        "95% t interval with n - 1 df (negative: SD degrades less).",
    ]
    for order, rows in table.items():
        lines += ["", f"## Removal order: {order}", ""]
        body = []
        for r in rows:
            gap = f"{r['gap']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]" if "gap" in r else "n/a"
            body.append([r["removed"], f"{r['constant']:.2f}", f"{r['sd']:.2f}", gap])
        lines.append(
            common.markdown_table(["blocks removed", "constant", "sd", "gap"], body).strip()
        )
    return "\n".join(lines)


def figure(table: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(table), figsize=(10, 4), sharey=True)
    for ax, (order, rows) in zip(axes, table.items(), strict=True):
        ks = [r["removed"] for r in rows]
        for arm, style in (("constant", "o-"), ("sd", "s-")):
            ax.plot(ks, [r[arm] for r in rows], style, label=arm)
        ax.set_title(f"removal order: {order}")
        ax.set_xlabel("residual blocks removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[0].legend()
    common.save_figure(fig, path, "ResNet-32 on digits: pruning blocks at inference")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--removed", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12, 15])
    parser.add_argument("--aggregate_only", action="store_true")
    parser.add_argument("--out_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out_dir)
    runs, prov = common.committed_runs(out)
    for seed in args.seeds:
        for arm in ARMS:
            if any(r["variant"] == arm and r["seed"] == seed for r in runs):
                continue
            if args.aggregate_only:
                continue
            workdir = common.REPO_ROOT / "workdirs" / "pruning" / f"{arm}_seed{seed}"
            record = common.train_run(CONFIG, workdir, _overrides(arm, seed))
            pruned = evaluate_pruned(workdir, arm, seed, args.removed)
            runs.append(
                {
                    "variant": arm,
                    "seed": seed,
                    "command": record["command"],
                    "test_error": record["test_error"],
                    "orders": pruned["orders"],
                    "errors": {
                        o: {str(k): v for k, v in e.items()} for o, e in pruned["errors"].items()
                    },
                }
            )
    table = analyse(runs, args.removed)
    num_blocks = len(runs[0]["orders"]["lowest_survival"]) if runs else 0
    results = {"runs": runs, "table": table, "provenance": common.provenance()}
    if prov is not None:
        results["runs_provenance"] = prov
    common.write_report(out, results, to_markdown(table, num_blocks, args.seeds) + "\n")
    figure(table, out / "pruning.png")
    print(f"wrote {out}/results.md")
    return results


if __name__ == "__main__":
    main()
