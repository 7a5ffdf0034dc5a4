"""Compiles and times the package's train step (`sdjax.steps.train_step`) for one setting.

The state comes from `sdjax.steps.create_train_state`, the optimizer from `sdjax.optim.create`
(SGD, Nesterov momentum 0.9, L2 weight decay 1e-4 on every parameter, constant learning rate
0.1), and the step is jitted as the trainer jits it (state donated). ``+dp`` rows run on the
trainer's mesh (`sdjax.runtime.create_mesh`: all devices, batch sharded on ``"data"``, state
replicated); other rows run on the default device. Inputs are already normalized: the step's
preprocessing is the identity (mean 0, std 1, no crop, no flip).

Keys: the run key is ``key(seed, impl=prng_impl)``; as in the trainer, the state is initialized
from ``fold_in(run_key, 0)`` and the steps get ``fold_in(run_key, 1)``, from which the step with
``state.step == s`` draws its dropout key (`dropout_key`). Every model and setting sees the same
key sequence.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.benchmark.bench import macs, settings
from sdjax import models, optim, runtime, steps

LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

IDENTITY_PREPROCESS = {"mean": (0.0,), "std": (1.0,), "crop_padding": 0, "flip": False}


def train_config() -> ml_collections.ConfigDict:
    """The ``config.optim`` fields that `sdjax.optim.create` and `create_train_state` read."""
    return ml_collections.ConfigDict(
        {
            "optim": {
                "optimizer": "sgd",
                "learning_rate": LEARNING_RATE,
                "momentum": MOMENTUM,
                "nesterov": True,
                "weight_decay": WEIGHT_DECAY,
                "weight_decay_on": "all",
                "lr_schedule": "constant",
                "warmup_steps": 0,
                "warmup_epochs": 0.0,
                "ema_decay": 0.0,
                "label_smoothing": 0.0,
            }
        }
    )


def dropout_key(train_key: jax.Array, step: int) -> jax.Array:
    """The ``"dropout"`` key `sdjax.steps.train_step` uses at ``state.step == step``."""
    return jax.random.fold_in(jax.random.fold_in(train_key, step), 0)


def summarize(times_s: Sequence[float]) -> dict[str, Any]:
    """Median, mean, min and max of step times given in seconds, in ms, and the list in ms."""
    ms = [1e3 * t for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "step_ms": ms,
    }


def _gates_fn(model: Any, setting: settings.Setting):
    if setting.base != "batch" or max(model.effective_block_rates()) <= 0:
        return None
    return functools.partial(models.batch_gates, model)


class StepRunner:
    """Calls one compiled train step and keeps what `run_jax` reports about the calls.

    Each call's wall time, the process's page faults and system CPU time, and the step's
    metrics are appended, so that steps of several rows can be interleaved (`run_jax` with
    ``args.rounds > 1`` in the benchmark) and summarised afterwards (`finish`).
    """

    def __init__(self, compiled, state, batch, train_key):
        self.compiled, self.state, self.batch, self.train_key = compiled, state, batch, train_key
        self.times: list[float] = []
        self.faults: list[int] = []
        self.system_s: list[float] = []
        self.metrics: list[Any] = []

    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            self.state, step_metrics = self.compiled(self.state, self.batch, self.train_key)
            jax.block_until_ready((self.state, step_metrics))
            self.times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.faults.append(after.ru_minflt - usage.ru_minflt)
            self.system_s.append(after.ru_stime - usage.ru_stime)
            self.metrics.append(step_metrics)

    def finish(self, row: dict[str, Any], name, model, wl, args) -> dict[str, Any]:
        """Adds the timed steps' figures (all calls after the first ``args.warmup``) to ``row``."""
        metrics = jax.device_get(self.metrics)
        row.update(summarize(self.times[args.warmup :]))
        # Whole-process figures (all threads): page faults and kernel CPU time per step, the cost
        # that `sdjax.host_malloc` removes.
        row["page_faults_per_step"] = statistics.median(self.faults[args.warmup :])
        row["system_cpu_ms_per_step"] = 1e3 * statistics.median(self.system_s[args.warmup :])
        row["warmup_ms"] = [1e3 * t for t in self.times[: args.warmup]]
        row["final_loss"] = float(metrics[-1]["loss"])
        if "blocks_run" in metrics[-1]:
            row.update(_realized_gates(name, model, wl, self.train_key, metrics, args))
        row["loadavg_after"] = os.getloadavg()
        self.state = self.batch = self.compiled = None  # free the row's memory
        return row


def prepare_jax(
    name: str,
    setting: settings.Setting,
    wl: settings.Workload,
    args: Any,
    *,
    compile_only: bool = False,
) -> tuple[dict[str, Any], Any, StepRunner | None]:
    """Builds and compiles the train step of ``name``: ``(row, model, runner)``.

    The row has the model, setting, shapes, devices and compile times; ``runner`` (None with
    ``compile_only``) calls the compiled step (`StepRunner`).
    """
    devices = jax.device_count() if setting.data_parallel else 1  # the mesh's size
    model = settings.build_model(name, setting, args.dtype, devices)
    inputs, labels = settings.synthetic_batch(wl, args.seed)
    run_key = jax.random.key(args.seed, impl=args.prng_impl)
    init_key, train_key = jax.random.fold_in(run_key, 0), jax.random.fold_in(run_key, 1)
    tx = optim.create(train_config().optim, total_steps=1, steps_per_epoch=1)
    init_fn = functools.partial(
        steps.create_train_state, train_config(), model, wl.input_shape, tx=tx
    )
    step_fn = functools.partial(
        steps.train_step,
        augment_kwargs=IDENTITY_PREPROCESS,
        num_classes=wl.num_classes,
        block_gates=_gates_fn(model, setting),
    )
    if setting.data_parallel:
        mesh = runtime.create_mesh()
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        init_jit = jax.jit(init_fn, out_shardings=replicated)
        step_jit = jax.jit(
            step_fn,
            in_shardings=(replicated, sharded, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
    else:
        replicated = sharded = jax.devices()[0]
        init_jit = jax.jit(init_fn)
        step_jit = jax.jit(step_fn, donate_argnums=0)

    start = time.perf_counter()
    if compile_only:
        state = jax.eval_shape(init_fn, init_key)
        batch = {
            "image": jax.ShapeDtypeStruct(inputs.shape, inputs.dtype),
            "label": jax.ShapeDtypeStruct(labels.shape, labels.dtype),
        }
    else:
        state = jax.block_until_ready(init_jit(jax.device_put(init_key, replicated)))
        batch = jax.device_put({"image": inputs, "label": labels}, sharded)
        train_key = jax.device_put(train_key, replicated)
    init_s = time.perf_counter() - start

    start = time.perf_counter()
    lowered = step_jit.lower(state, batch, train_key)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    row: dict[str, Any] = {
        "framework": "jax",
        "model": name,
        "setting": setting.name,
        "model_overrides": {k: str(v) for k, v in setting.overrides.items()},
        "batch_size": wl.batch_size,
        "image_size": wl.image_size,
        "input_shape": list(wl.input_shape),
        "devices": devices,
        "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "lower_plus_compile_s": lower_s + compile_s,
        "block_drop_rates": macs.block_drop_rates(model),
    }
    runner = None if compile_only else StepRunner(compiled, state, batch, train_key)
    return row, model, runner


def run_jax(
    name: str,
    setting: settings.Setting,
    wl: settings.Workload,
    args: Any,
    *,
    compile_only: bool = False,
) -> dict[str, Any]:
    """Builds, compiles and (unless ``compile_only``) times the train step of ``name``.

    Args:
      args: ``seed``, ``prng_impl``, ``dtype``, ``warmup``, ``steps`` (command-line values).

    Returns:
      The row: model, setting, shapes, devices, compile times and, when timed, step times
      (`summarize` of the timed steps), page faults and system CPU time per step; batch-mode
      rows add the blocks each timed step ran and their MAC-weighted kept compute.

    Raises:
      RuntimeError: the gates recomputed from the keys disagree with the blocks the step
        reported running (the key derivation of `dropout_key` no longer matches the step's).
    """
    row, model, runner = prepare_jax(name, setting, wl, args, compile_only=compile_only)
    if runner is None:
        return row
    runner.run(args.warmup + args.steps)
    return runner.finish(row, name, model, wl, args)


def _realized_gates(name, model, wl, train_key, metrics, args) -> dict[str, Any]:
    """Per timed step: the blocks run (the step's own ``blocks_run`` metric) and the
    MAC-weighted kept compute of the gates recomputed from the step's key."""
    gates_of = jax.jit(functools.partial(models.batch_gates, model))
    steps = range(args.warmup, args.warmup + args.steps)
    gates = [np.asarray(gates_of(dropout_key(train_key, s))) for s in steps]
    blocks_run = [int(metrics[s]["blocks_run"]) for s in steps]
    if blocks_run != [int(g.sum()) for g in gates]:
        raise RuntimeError(
            f"{name}: the steps ran {blocks_run} blocks but the gates of dropout_key() give "
            f"{[int(g.sum()) for g in gates]}; dropout_key no longer matches sdjax.steps"
        )
    return {
        "blocks_run_per_step": blocks_run,
        "kept_block_compute_per_step": [
            macs.kept_block_compute(name, wl.image_size, g.astype(float).tolist()) for g in gates
        ],
    }
