"""Experiment 5: dropout on an over-fitting MLP (a 1-D regression with few noisy points).

Command (from the repository root; about a minute on two CPU cores):

    python -m experiments.dropout_mlp.run

Smoke run (a few seconds, writes elsewhere):

    python -m experiments.dropout_mlp.run --quick --out /tmp/dropout_mlp

What it does:

* Data: `num_train` inputs drawn uniformly from [-1, 1], targets `sin(3 x) + N(0, noise_std^2)`;
  the test set is `num_test` fresh points from the same distribution (so the best reachable test MSE is
  the noise variance `noise_std^2`).
* Model: an MLP with `hidden` ReLU layers; `sdjax.layers.Dropout(drop_rate)` after each hidden ReLU, none
  on the input and none on the output layer. Drop rates 0 and 0.5, `num_seeds` seeds each (the seed sets
  the initialisation and the dropout keys; the data are the same for every run).
* Training: full batch, optax Adam, `num_steps` steps, all inside one `lax.scan` under `jax.jit`. Every
  `eval_every` steps: the mean train-mode loss over those steps (what the optimiser saw), and the
  eval-mode (dropout off) MSE on the training and on the test points.
* Scale check (inverted dropout): for the trained rate-0.5 network, the train-mode activations after
  each dropout layer averaged over `num_keys` dropout keys, compared with the eval-mode activations.
  After the first hidden layer the input of the dropout is deterministic, so the expectation must equal
  the eval activation exactly; the deviation is compared with the Monte-Carlo standard error
  `eval * sqrt(rate / (1 - rate) / num_keys)`. Deeper layers and the output see earlier random masks
  through ReLUs, so there the eval-mode value is only the usual "weight scaling" approximation of the
  mean; the script reports how close it is.

Writes `results.json` (raw curves, final numbers, provenance), `results.md` (tables) and
`dropout_mlp.png` (fitted functions, loss curves, scale check) to `experiments/dropout_mlp/results/`.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from sdjax.layers import Dropout

NAME = "dropout_mlp"
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


class MLP(nn.Module):
    """ReLU MLP for inputs [n, 1] -> outputs [n, 1], with dropout after each hidden ReLU.

    Attributes:
      hidden: widths of the hidden layers.
      drop_rate: probability of dropping each hidden unit in train mode (0 = no dropout).
    """

    hidden: Sequence[int]
    drop_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
            x = Dropout(self.drop_rate, name=f"dropout_{i}")(x, deterministic=not train)
            self.sow("intermediates", f"hidden_{i}", x)
        return nn.Dense(1, name="out")(x)


def true_function(x: np.ndarray) -> np.ndarray:
    return np.sin(3.0 * x)


def make_data(num_train: int, num_test: int, noise_std: float, seed: int) -> dict[str, np.ndarray]:
    """Training and test points, float32 arrays of shape [n, 1]; a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    x_train = np.sort(rng.uniform(-1.0, 1.0, size=(num_train, 1)), axis=0)
    x_test = rng.uniform(-1.0, 1.0, size=(num_test, 1))
    data = {
        "x_train": x_train,
        "y_train": true_function(x_train) + noise_std * rng.standard_normal((num_train, 1)),
        "x_test": x_test,
        "y_test": true_function(x_test) + noise_std * rng.standard_normal((num_test, 1)),
    }
    return {k: v.astype(np.float32) for k, v in data.items()}


def make_trainer(model: MLP, learning_rate: float, num_steps: int, eval_every: int):
    """A jitted `train(seed_key, data) -> (params, curves)`; curves are [num_steps // eval_every] each."""
    optimizer = optax.adam(learning_rate)
    num_chunks = num_steps // eval_every

    def mse(params, x, y, train, key=None):
        rngs = {"dropout": key} if train else None
        pred = model.apply({"params": params}, x, train=train, rngs=rngs)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def train(seed_key, data):
        init_key, dropout_key = jax.random.split(seed_key)
        params = model.init(init_key, data["x_train"], train=False)["params"]
        opt_state = optimizer.init(params)

        def step(carry, step_index):
            params, opt_state = carry
            key = jax.random.fold_in(dropout_key, step_index)
            loss, grads = jax.value_and_grad(mse)(
                params, data["x_train"], data["y_train"], True, key
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def chunk(carry, chunk_index):
            steps = chunk_index * eval_every + jnp.arange(eval_every)
            carry, losses = jax.lax.scan(step, carry, steps)
            params = carry[0]
            metrics = {
                "train_mode_loss": losses.mean(),
                "train_mse": mse(params, data["x_train"], data["y_train"], False),
                "test_mse": mse(params, data["x_test"], data["y_test"], False),
            }
            return carry, metrics

        (params, _), curves = jax.lax.scan(chunk, (params, opt_state), jnp.arange(num_chunks))
        return params, curves

    return train


def scale_check(model: MLP, params, x: np.ndarray, key: jax.Array, num_keys: int) -> dict[str, Any]:
    """Monte-Carlo mean of train-mode activations over `num_keys` dropout keys vs eval mode.

    Returns, per hidden layer and for the output: the eval-mode and mean train-mode values (numpy), the
    ratio sum(mean)/sum(eval), and the largest z-score of the deviation (first layer only, where the
    Monte-Carlo standard error is known exactly).
    """
    chunk = 250
    num_chunks = max(1, num_keys // chunk)
    num_keys = num_chunks * chunk

    def activations(train, key=None):
        rngs = {"dropout": key} if train else None
        out, state = model.apply(
            {"params": params}, x, train=train, rngs=rngs, mutable=["intermediates"]
        )
        acts = {name: v[0] for name, v in state["intermediates"].items()}
        acts["output"] = out
        return acts

    @jax.jit
    def mc_sum(key):
        def body(total, chunk_index):
            keys = jax.random.split(jax.random.fold_in(key, chunk_index), chunk)
            acts = jax.vmap(lambda k: activations(True, k))(keys)
            return jax.tree.map(lambda t, a: t + a.sum(0), total, acts), None

        zeros = jax.tree.map(jnp.zeros_like, activations(False))
        total, _ = jax.lax.scan(body, zeros, jnp.arange(num_chunks))
        return total

    eval_acts = jax.tree.map(np.asarray, activations(False))
    mean_acts = jax.tree.map(lambda t: np.asarray(t) / num_keys, mc_sum(key))
    rate = model.drop_rate
    out: dict[str, Any] = {"num_keys": num_keys, "drop_rate": rate, "layers": {}}
    for name in sorted(eval_acts):
        ev, mc = eval_acts[name], mean_acts[name]
        entry = {
            # Hidden activations are >= 0 (ReLU), so the ratio of sums is a meaningful summary;
            # the output is signed, so it gets none.
            "ratio_of_sums": float(mc.sum() / ev.sum()) if name != "output" else None,
            "mean_abs_diff": float(np.abs(mc - ev).mean()),
            "mean_abs_eval": float(np.abs(ev).mean()),
        }
        if name == "hidden_0":
            active = ev > 0
            stderr = ev[active] * np.sqrt(rate / (1.0 - rate) / num_keys)
            z = (mc[active] - ev[active]) / stderr
            entry.update(
                {
                    "num_active_units": int(active.sum()),
                    "max_abs_z": float(np.abs(z).max()),
                    "rms_z": float(np.sqrt(np.mean(z**2))),
                    "max_rel_err": float(np.abs(mc[active] / ev[active] - 1).max()),
                    "expected_rel_stderr": float(np.sqrt(rate / (1.0 - rate) / num_keys)),
                }
            )
        out["layers"][name] = entry
    out["_arrays"] = {"eval": eval_acts, "mean": mean_acts}
    return out


def summarize(
    runs: dict[float, list[dict[str, np.ndarray]]], eval_every: int
) -> list[dict[str, Any]]:
    """Per drop rate: final and best eval-mode MSEs (mean and std over seeds); pure numpy."""
    rows = []
    for rate, seeds in sorted(runs.items()):
        final_train = [float(c["train_mse"][-1]) for c in seeds]
        final_test = [float(c["test_mse"][-1]) for c in seeds]
        best_test = [float(np.min(c["test_mse"])) for c in seeds]
        best_step = [int((np.argmin(c["test_mse"]) + 1) * eval_every) for c in seeds]
        rows.append(
            {
                "drop_rate": rate,
                "num_seeds": len(seeds),
                "final_train_mse": common.mean_std(final_train),
                "final_test_mse": common.mean_std(final_test),
                "best_test_mse": common.mean_std(best_test),
                "best_test_step_median": int(np.median(best_step)),
                "final_train_mse_all": final_train,
                "final_test_mse_all": final_test,
            }
        )
    return rows


def results_markdown(rows, scale, args, prov, wall_s) -> str:
    pm = "±"
    table = common.markdown_table(
        [
            "dropout rate",
            "seeds",
            "final train MSE (eval mode)",
            "final test MSE",
            "best test MSE (median step)",
        ],
        [
            [
                r["drop_rate"],
                r["num_seeds"],
                f"{r['final_train_mse'][0]:.4f} {pm} {r['final_train_mse'][1]:.4f}",
                f"{r['final_test_mse'][0]:.4f} {pm} {r['final_test_mse'][1]:.4f}",
                f"{r['best_test_mse'][0]:.4f} {pm} {r['best_test_mse'][1]:.4f} "
                f"({r['best_test_step_median']})",
            ]
            for r in rows
        ],
    )
    layers = scale["layers"]
    first = layers["hidden_0"]
    scale_rows = [
        [
            name,
            "n/a (signed)" if e["ratio_of_sums"] is None else f"{e['ratio_of_sums']:.4f}",
            f"{e['mean_abs_diff']:.4g}",
            f"{e['mean_abs_eval']:.4g}",
        ]
        for name, e in layers.items()
    ]
    scale_table = common.markdown_table(
        ["activation", "sum(mean train) / sum(eval)", "mean abs diff", "mean abs eval value"],
        scale_rows,
    )
    return (
        "# Experiment 5: dropout on an over-fitting MLP\n\n"
        f"1-D regression: {args.num_train} training points, y = sin(3x) + N(0, {args.noise_std}^2), "
        f"x ~ U[-1, 1]; test MSE on {args.num_test} fresh noisy points (noise floor "
        f"{args.noise_std**2:.4f}). MLP {args.hidden} ReLU, `sdjax.layers.Dropout` after each hidden "
        f"ReLU, full-batch Adam (lr {args.learning_rate}) for {args.num_steps} steps; mean {pm} std "
        f"over {args.num_seeds} seeds (initialisation and dropout keys). Wall-clock {wall_s:.1f} s.\n\n"
        + table
        + "\n![fitted functions, loss curves and scale check](dropout_mlp.png)\n\n"
        "## Scale check (inverted dropout)\n\n"
        f"Trained rate-{scale['drop_rate']} network, seed 0, the {args.num_train} training inputs; "
        f"train-mode activations averaged over {scale['num_keys']} dropout keys vs eval mode.\n\n"
        + scale_table
        + "\nAfter the first hidden layer (deterministic input), the Monte-Carlo mean matches the "
        f"eval-mode activation of all {first['num_active_units']} active units: largest relative "
        f"error {first['max_rel_err']:.4f} (standard error per unit "
        f"{first['expected_rel_stderr']:.4f}), largest |z| {first['max_abs_z']:.2f}, rms z "
        f"{first['rms_z']:.2f} (1 expected). Without the 1/(1-rate) scaling the ratio would be "
        f"{1 - scale['drop_rate']:.2f}. Deeper layers and the output see the earlier random masks "
        "through ReLUs, so their eval-mode value is only an approximation of the mean (the usual "
        "weight-scaling rule); the table shows how close it is.\n\n"
        "## Provenance\n\n" + common.provenance_markdown(prov)
    )


def plot(path, data, fits, curves, scale, eval_every) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    grid = fits["x"]
    ax.plot(grid, true_function(grid), "k--", lw=1, label="sin(3x)")
    ax.scatter(data["x_train"], data["y_train"], c="k", s=18, zorder=3, label="training points")
    colors = {0.0: "tab:red", 0.5: "tab:blue"}
    for rate, pred in fits["eval"].items():
        ax.plot(grid, pred, color=colors.get(rate), lw=2, label=f"dropout {rate} (eval mode)")
    for i, pred in enumerate(fits.get("train_samples", [])):
        label = "dropout 0.5: thinned networks (train mode, one mask each)" if i == 0 else None
        ax.plot(grid, pred, color="tab:blue", lw=0.7, alpha=0.4, ls="-", label=label)
    ax.set_ylim(-2.6, 1.8)
    ax.set_title("fitted functions (seed 0)")
    ax.set_xlabel("x")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    for rate, seeds in sorted(curves.items()):
        steps = (np.arange(len(seeds[0]["test_mse"])) + 1) * eval_every
        for key, style in (("train_mse", ":"), ("test_mse", "-")):
            vals = np.stack([c[key] for c in seeds])
            mean, std = vals.mean(0), vals.std(0)
            label = f"dropout {rate}: {'train' if key == 'train_mse' else 'test'}"
            ax.plot(steps, mean, style, color=colors.get(rate), label=label)
            ax.fill_between(steps, mean - std, mean + std, color=colors.get(rate), alpha=0.15)
    ax.axhline(fits["noise_var"], color="gray", lw=0.8, ls="--", label="noise variance")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("MSE (eval mode)")
    ax.set_title(f"loss curves (mean ± std, {len(curves[0.0])} seeds)")
    ax.legend(fontsize=7)

    ax = axes[2]
    arrays = scale["_arrays"]
    for name, color in (("hidden_0", "tab:blue"), (sorted(arrays["eval"])[-2], "tab:orange")):
        ev, mc = arrays["eval"][name].ravel(), arrays["mean"][name].ravel()
        ax.scatter(ev, mc, s=3, alpha=0.4, color=color, label=f"{name}")
    hi = float(max(arrays["eval"]["hidden_0"].max(), arrays["mean"]["hidden_0"].max()))
    ax.plot([0, hi], [0, hi], "k-", lw=0.8, label="y = x")
    ax.plot(
        [0, hi], [0, hi * (1 - scale["drop_rate"])], "k:", lw=0.8, label="no 1/(1-rate) scaling"
    )
    ax.set_xlabel("eval-mode activation")
    ax.set_ylabel(f"mean train-mode activation ({scale['num_keys']} keys)")
    ax.set_title("scale check (dropout 0.5, inverted)")
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument(
        "--out", default=None, help="output folder (default experiments/dropout_mlp/results)"
    )
    parser.add_argument("--num_train", type=int, default=16)
    parser.add_argument("--num_test", type=int, default=1000)
    parser.add_argument("--noise_std", type=float, default=0.3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 256])
    parser.add_argument("--drop_rates", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_steps", type=int, default=3000)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--num_seeds", type=int, default=5)
    parser.add_argument("--num_keys", type=int, default=20000, help="keys for the scale check")
    parser.add_argument("--data_seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.num_steps, args.num_seeds, args.num_keys = [64, 64], 200, 2, 1000
    if 0.5 not in args.drop_rates or 0.0 not in args.drop_rates:
        parser.error("--drop_rates must contain 0.0 (the baseline) and 0.5 (the scale check)")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = common.results_dir(RESULTS_DIR, args.out)
    start = time.perf_counter()
    data = make_data(args.num_train, args.num_test, args.noise_std, args.data_seed)
    data_j = jax.tree.map(jnp.asarray, data)
    grid = np.linspace(-1.05, 1.05, 400, dtype=np.float32)[:, None]

    curves: dict[float, list[dict[str, np.ndarray]]] = {}
    fits: dict[str, Any] = {"x": grid, "eval": {}, "noise_var": args.noise_std**2}
    trained: dict[float, Any] = {}
    for rate in args.drop_rates:
        model = MLP(tuple(args.hidden), rate)
        train = make_trainer(model, args.learning_rate, args.num_steps, args.eval_every)
        curves[rate] = []
        for seed in range(args.num_seeds):
            params, run_curves = train(jax.random.key(seed), data_j)
            curves[rate].append({k: np.asarray(v) for k, v in run_curves.items()})
            if seed == 0:
                trained[rate] = (model, params)
                fits["eval"][rate] = np.asarray(model.apply({"params": params}, grid, train=False))
        print(
            f"dropout {rate}: final test MSE "
            f"{np.mean([c['test_mse'][-1] for c in curves[rate]]):.4f} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )

    model, params = trained[0.5]

    # A "thinned" network: the same dropout key for every grid point (vmap over single points), so
    # each curve is one sub-network; with one batched call every point would get its own mask.
    def thinned(key):
        def one(x):
            return model.apply({"params": params}, x[None], train=True, rngs={"dropout": key})[0]

        return np.asarray(jax.vmap(one)(grid))

    fits["train_samples"] = [thinned(k) for k in jax.random.split(jax.random.key(1234), 3)]
    scale = scale_check(model, params, data["x_train"], jax.random.key(99), args.num_keys)
    rows = summarize(curves, args.eval_every)
    wall_s = time.perf_counter() - start
    prov = common.provenance()

    results = {
        "experiment": "5: dropout on an over-fitting MLP",
        "args": vars(args),
        "summary": rows,
        "scale_check": {k: v for k, v in scale.items() if k != "_arrays"},
        "curves": {
            str(rate): {
                "steps": (
                    (np.arange(args.num_steps // args.eval_every) + 1) * args.eval_every
                ).tolist(),
                "seeds": [{k: v.tolist() for k, v in c.items()} for c in seeds],
            }
            for rate, seeds in curves.items()
        },
        "wall_clock_s": wall_s,
        "provenance": prov,
    }
    common.write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(results_markdown(rows, scale, args, prov, wall_s))
    plot(out_dir / f"{NAME}.png", data, fits, curves, scale, args.eval_every)
    print((out_dir / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
