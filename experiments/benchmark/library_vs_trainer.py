"""The library path vs the trainer's path: one model, two train steps, timed side by side.

(Formerly `experiments/library_path.py`; renamed so as not to be confused with
`sdjax.onednn.library.library_path()`.)

* library: ``sdjax.models.create(name)`` with a plain ``jax.jit`` SGD-Nesterov step written as a
  user would (optax, cross-entropy, ``mutable=["batch_stats"]``), no trainer, no config;
* trainer: the same model through ``sdjax.steps.train_step`` (what ``python -m sdjax.main`` runs).

Both use the model's defaults (scanned stages, ``conv_impl="auto"``) and the same synthetic batch;
the steps are interleaved (one of each per round, `experiments.common.timing.interleaved`) so
that load changes hit both.

    python -m experiments.benchmark.library_vs_trainer --model cifar_resnet110 --steps 10

Writes ``experiments/benchmark/results/library_vs_trainer/results.{json,md}`` with the command, CPU model and ISA.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.benchmark.bench import timing
from experiments.common import timing as common_timing
from sdjax import models, optim, steps


def library_step(model, tx):
    """The step a user writes around ``models.create``: pure, jitted, state donated."""

    def step(params, batch_stats, opt_state, images, labels, key):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def run(args: argparse.Namespace) -> dict:
    model = models.create(args.model)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=args.batch_size), jnp.int32)
    variables = model.init(jax.random.key(0), images[:1])
    tx = optax.sgd(timing.LEARNING_RATE, momentum=timing.MOMENTUM, nesterov=True)
    lib = library_step(model, tx)
    lib_state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    config = timing.train_config()
    trainer_tx = optim.create(config.optim, total_steps=1, steps_per_epoch=1)
    state = jax.jit(
        functools.partial(steps.create_train_state, config, model, shape[1:], tx=trainer_tx)
    )(jax.random.key(0))
    trainer = jax.jit(
        functools.partial(
            steps.train_step, augment_kwargs=timing.IDENTITY_PREPROCESS, num_classes=10
        ),
        donate_argnums=0,
    )
    batch = {"image": images, "label": labels}
    key = jax.random.key(1)

    step_index = iter(range(1 << 30))

    def run_library():
        nonlocal lib_state
        *lib_state, loss = lib(
            *lib_state, images, labels, jax.random.fold_in(key, next(step_index))
        )
        jax.block_until_ready(loss)

    def run_trainer():
        nonlocal state
        state, metrics = trainer(state, batch, key)
        jax.block_until_ready(metrics["loss"])

    times = common_timing.interleaved(
        {"library": run_library, "trainer": run_trainer},
        rounds=args.steps,
        per_round=1,
        warmup=args.warmup,
    )
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "times_ms": times,
        "median_ms": medians,
        "library_over_trainer": medians["library"] / medians["trainer"],
        "provenance": common.provenance(),
    }


def to_markdown(result: dict) -> str:
    rows = [
        [path, f"{result['median_ms'][path]:.1f}", f"{min(t):.1f}-{max(t):.1f}"]
        for path, t in result["times_ms"].items()
    ]
    return "\n\n".join(
        [
            "# Library path vs trainer path (one process, interleaved steps)",
            f"`models.create({result['model']!r})`, batch {result['batch_size']}, "
            f"{result['image_size']}x{result['image_size']} synthetic images, "
            f"{result['steps']} timed steps each.",
            common.markdown_table(["path", "median ms", "min-max ms"], rows),
            f"library / trainer: **{result['library_over_trainer']:.3f}**",
            common.provenance_markdown(result["provenance"]),
        ]
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet110")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out_dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    out = common.results_dir(
        pathlib.Path(__file__).resolve().parent / "results" / "library_vs_trainer", args.out_dir
    )
    common.write_json(out / "results.json", result)
    (out / "results.md").write_text(to_markdown(result) + "\n")
    print(f"library / trainer = {result['library_over_trainer']:.3f} ({out})")
    return result


if __name__ == "__main__":
    main()
