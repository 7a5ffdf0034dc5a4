"""Training and evaluation: train state, a data-parallel jitted train step, and the loop.

* :func:`train_step` is pure: ``(state, batch, rng) -> (state, metrics)``. The step's key is
  ``fold_in(rng, state.step)`` (``rng`` is the run's fixed train key), so a resumed run draws the
  same drop gates and augmentation as an uninterrupted one. It is compiled once with ``jax.jit``
  over a 1-D device mesh with axis ``"data"``: the batch is sharded along it, the state is
  replicated and donated; BatchNorm statistics are over the global batch (the batch is one global
  array).
* :func:`train_and_evaluate` validates the config (before anything compiles or is written),
  restores the latest checkpoint if there is one, trains, evaluates every
  ``eval_every_epochs`` epochs (test error at the best validation epoch, as in the paper),
  checkpoints periodically and on SIGTERM, stops on a NaN/inf loss without saving it, and writes
  ``workdir/results.json``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sdjax
from sdjax import checkpoint as checkpoint_lib
from sdjax import config_utils, host_malloc, models, optim
from sdjax import data as data_lib
from sdjax.data import augment

__all__ = [
    "TrainState",
    "create_mesh",
    "create_model",
    "create_train_state",
    "eval_step",
    "maybe_initialize_distributed",
    "train_and_evaluate",
    "train_step",
]


class TrainState(train_state.TrainState):
    """Flax train state plus BatchNorm statistics and the EMA of the parameters.

    Attributes:
      batch_stats: the model's ``batch_stats`` collection (``{}`` if none).
      ema_params: exponential moving average of ``params`` (``{}`` when EMA is off).
    """

    batch_stats: Any = None
    ema_params: Any = None


def request_cpu_devices(count: int) -> bool:
    """Asks JAX to split its CPU backend into ``count`` devices (``jax_num_cpu_devices``).

    Returns False, changing nothing, when JAX has already initialized its backends with another
    count (the setting only takes effect before that); touches no device itself, so it may run
    before ``jax.distributed.initialize``.
    """
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return False
    return True


def configure_host_malloc(config: ml_collections.ConfigDict) -> bool:
    """Applies ``config.train.host_malloc`` (`sdjax.host_malloc.configure`) to this process.

    Runs first in `train_and_evaluate`, before JAX starts its backend threads (they choose their
    malloc arena on their first allocation). Returns whether the allocator settings were applied.

    Raises:
      ValueError: the field is not one of `sdjax.host_malloc.MODES`.
    """
    mode = config.train.get("host_malloc", "auto")
    config_utils.check_host_malloc(mode)
    return host_malloc.configure(mode)


def configure_cpu_devices(config: ml_collections.ConfigDict) -> None:
    """Splits the CPU backend into ``config.train.num_cpu_devices`` devices (0: leave it alone).

    Must run before JAX initializes its backends. If they are already initialized (e.g. an
    earlier computation in this process) with the requested count, nothing happens.

    Raises:
      ValueError: the field is not an integer >= 0, or the CPU backend of this process is
        already initialized with a different number of devices.
    """
    n = config.train.get("num_cpu_devices", 0)
    config_utils.check_num_cpu_devices(n)
    if n == 0:
        return
    if not request_cpu_devices(n):
        current = len(jax.devices("cpu"))
        if current != n:
            raise ValueError(
                f"train.num_cpu_devices={n}: the CPU backend of this process is already "
                f"initialized with {current} device(s); set the field in a fresh process (as "
                "`python -m sdjax.main` does) or use 0 to keep the current devices."
            ) from None


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Calls ``jax.distributed.initialize`` when ``config.train.distributed`` (multi-host).

    Must run before anything touches the devices. The coordinator fields are passed when set;
    otherwise JAX auto-detects them (Cloud TPU, SLURM, ...). A second call is a no-op.
    """
    if not config.train.distributed or jax.distributed.is_initialized():
        return
    kwargs = {
        "coordinator_address": config.train.coordinator_address,
        "num_processes": config.train.num_processes,
        "process_id": config.train.process_id,
    }
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def create_mesh() -> Mesh:
    """A 1-D mesh over all (global) devices with the axis name ``"data"``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def create_model(config: ml_collections.ConfigDict):
    """``sdjax.models.create`` with ``config.model`` (``dtype=bfloat16`` if half precision)."""
    kwargs = config_utils.model_kwargs(config)
    return models.create(kwargs.pop("name"), **kwargs)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    tx: optax.GradientTransformation,
) -> TrainState:
    """Initialises the parameters (on one zero image of ``image_shape``) and the optimizer.

    Pure: jit it (or ``jax.eval_shape`` it) with the output replicated over the mesh.
    """
    variables = model.init({"params": rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        ema_params=params if config.optim.ema_decay > 0 else {},
    )


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy, float32 ``[B]``, with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    augment_kwargs: dict[str, Any],
    num_classes: int,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
    block_gates: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a global batch.

    Args:
      state: the train state (donated by the jitted caller).
      batch: ``{"image": [B, H, W, C], "label": int32 [B]}`` (global, sharded on ``"data"``).
      rng: the run's train key; this step uses ``fold_in(rng, state.step)``, split into the
        ``"dropout"`` key (stochastic depth / dropout) and the augmentation key.
      augment_kwargs: static arguments of :func:`sdjax.data.augment.preprocess`.
      num_classes, label_smoothing: the loss.
      ema_decay: decay of the parameter EMA (0 = off).
      block_gates: for batch-mode stochastic depth, ``block_gates(dropout_key)`` -> the bool
        per-block gates the model draws (``functools.partial(sdjax.models.batch_gates, model)``);
        adds the metric ``"blocks_run"``, the number of residual blocks the step computed.

    Returns:
      ``(new_state, {"loss", "accuracy", "learning_rate"[, "blocks_run"]})`` (float32
      scalars; loss and accuracy are batch means).
    """
    step_key = jax.random.fold_in(rng, state.step)
    dropout_key = jax.random.fold_in(step_key, 0)
    augment_key = jax.random.fold_in(step_key, 1)
    images = augment.preprocess(batch["image"], augment_key, **augment_kwargs)
    labels = batch["label"]

    def loss_fn(params):
        logits, new_vars = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = jnp.mean(cross_entropy(logits, labels, num_classes, label_smoothing))
        return loss, (logits, new_vars.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay > 0:
        ema = jax.tree.map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_state.params
        )
        new_state = new_state.replace(ema_params=ema)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": jnp.asarray(new_state.opt_state.hyperparams["learning_rate"], jnp.float32),
    }
    if block_gates is not None:
        metrics["blocks_run"] = jnp.sum(block_gates(dropout_key), dtype=jnp.float32)
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    augment_kwargs: dict[str, Any],
    num_classes: int,
    use_ema: bool = False,
) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the real (``mask``) examples of a batch.

    Args:
      batch: ``{"image", "label", "mask": bool [B]}`` (padded to a fixed size).
      use_ema: evaluate the EMA parameters.

    Returns:
      ``{"loss_sum", "correct", "count"}`` float32 scalars.
    """
    params = state.ema_params if use_ema else state.params
    images = augment.preprocess(batch["image"], None, **augment_kwargs)
    logits = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=False
    )
    mask = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], num_classes)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def _to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's slice of a batch -> global arrays sharded on the ``"data"`` axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _evaluate(eval_fn, state, data, split, batch_size, sharding) -> dict[str, float]:
    totals = None
    batches = data.eval_batches(split, batch_size, jax.process_index(), jax.process_count())
    for batch in batches:
        out = eval_fn(state, _to_global(batch, sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        f"{split}_accuracy": float(totals["correct"]) / count,
        f"{split}_loss": float(totals["loss_sum"]) / count,
    }


class _Preemption:
    """Turns SIGTERM into a flag checked between steps (TPU preemption notice)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service in this jax.distributed setup
                return False
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _versions() -> dict[str, str]:
    import orbax.checkpoint  # noqa: PLC0415

    return {
        "sdjax": sdjax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _device_info() -> dict[str, Any]:
    return {
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
    }


def _write_json(path: str, payload: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def _json_model_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(json.dumps(config.model.to_dict(), default=str))


def _block_gates_fn(model) -> Callable[[jax.Array], jax.Array] | None:
    """``batch_gates`` of ``model`` when it trains with batch-mode stochastic depth, else None."""
    if model.drop_mode != "batch" or max(model.effective_block_rates()) <= 0:
        return None
    return functools.partial(models.batch_gates, model)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates ``config``, resuming from ``workdir/checkpoints`` if present.

    Writes ``workdir/metrics.jsonl``, TensorBoard events in ``workdir/tensorboard``,
    checkpoints in ``workdir/checkpoints`` and, when training is complete,
    ``workdir/results.json`` (returned as a dict). After SIGTERM a checkpoint is saved and
    ``{"preempted": True, "steps": step}`` is returned.

    Raises:
      ValueError: an invalid config, missing dataset, unwritable workdir or incompatible
        checkpoint (before anything is compiled).
      FloatingPointError: a NaN/inf training loss (the last good checkpoint is kept).
    """
    malloc_applied = configure_host_malloc(config)
    configure_cpu_devices(config)
    maybe_initialize_distributed(config)
    config_utils.validate(config, workdir)
    data = data_lib.create(config.input)
    is_main = jax.process_index() == 0
    batch_size = config.train.batch_size
    steps_per_epoch = data.steps_per_epoch(batch_size)
    if config.train.num_train_steps > 0:
        total_steps = int(config.train.num_train_steps)
    else:
        total_steps = max(int(round(config.train.num_epochs * steps_per_epoch)), 1)

    mesh = create_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    seed_key = jax.random.key(config.seed, impl=config.prng_impl)
    init_key, train_key = jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1)
    model = create_model(config)
    tx = optim.create(config.optim, total_steps, steps_per_epoch)
    image_shape = tuple(data.info.image_shape)
    init_fn = functools.partial(create_train_state, config, model, image_shape, tx=tx)
    state = jax.jit(init_fn, out_shardings=replicated)(init_key)
    # Not device_put: with several hosts the replicated sharding is not fully addressable.
    train_key = jax.jit(lambda key: key, out_shardings=replicated)(train_key)

    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        config.train.keep_checkpoints,
        _json_model_config(config),
    )
    meta: dict[str, Any] = {"best_val_accuracy": None, "train_time_s": 0.0}
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        logging.info("Resumed from %s at step %d.", checkpointer.directory, int(state.step))
    start_step = int(jax.device_get(state.step))

    augment_kwargs = data.augment_kwargs()
    train_fn = jax.jit(
        functools.partial(
            train_step,
            augment_kwargs=augment_kwargs,
            num_classes=config.model.num_classes,
            label_smoothing=config.optim.label_smoothing,
            ema_decay=config.optim.ema_decay,
            block_gates=_block_gates_fn(model),
        ),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(
            eval_step,
            augment_kwargs=augment_kwargs,
            num_classes=config.model.num_classes,
            use_ema=config.optim.ema_decay > 0,
        ),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    from sdjax import metrics as metrics_lib  # noqa: PLC0415 (imports TensorFlow via clu)

    writer = metrics_lib.create_writer(workdir, is_main)
    if is_main and start_step == 0:
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    progress = metrics_lib.ProgressBar(total_steps, start_step, config.train.progress_bar)
    preemption = _Preemption()
    batches = data.train_iterator(
        config.seed, start_step, batch_size, jax.process_index(), jax.process_count()
    )
    has_val = len(data.val[1]) > 0
    pending: list[dict[str, jax.Array]] = []
    last = {"loss": float("nan"), "time": time.time(), "step": start_step}
    run_start = time.time()
    epoch_start = time.time()
    eval_metrics: dict[str, float] = {}

    def flush_train_metrics(step: int) -> None:
        """Fetches pending step metrics, stops on NaN/inf, and writes their means."""
        if not pending:
            return
        values = jax.device_get(pending)
        pending.clear()
        losses = np.array([v["loss"] for v in values])
        if not np.all(np.isfinite(losses)):
            bad = step - len(values) + int(np.argmin(np.isfinite(losses))) + 1
            raise FloatingPointError(
                f"training loss became {losses[~np.isfinite(losses)][0]} at step {bad}; stopping "
                f"without saving. The last good checkpoint (step {checkpointer.latest_step()}) "
                f"is kept in {checkpointer.directory}. Lower config.optim.learning_rate or check "
                "the data."
            )
        now = time.time()
        last["loss"] = float(losses.mean())
        scalars = {
            "train_loss": last["loss"],
            "train_accuracy": float(np.mean([v["accuracy"] for v in values])),
            "learning_rate": float(values[-1]["learning_rate"]),
            "examples_per_s": (step - last["step"]) * batch_size / max(now - last["time"], 1e-9),
        }
        if "blocks_run" in values[0]:
            # Batch-mode stochastic depth: residual blocks computed per step (mean over the
            # logged steps) -- the depth the steps actually trained.
            scalars["train_blocks_run"] = float(np.mean([v["blocks_run"] for v in values]))
        last.update(time=now, step=step)
        writer.write_scalars(step, scalars)
        progress.update(step, loss=scalars["train_loss"])

    def save(step: int) -> None:
        flush_train_metrics(step)  # never save a state whose loss was NaN
        meta["train_time_s"] = meta_time()
        checkpointer.save(step, state, meta)

    time_offset = float(meta.get("train_time_s") or 0.0)

    def meta_time() -> float:
        return time_offset + time.time() - run_start

    def run_eval(step: int, epoch: int) -> None:
        nonlocal eval_metrics
        eval_metrics = {}
        if has_val:
            eval_metrics.update(_evaluate(eval_fn, state, data, "val", eval_bs, batch_sharding))
        eval_metrics.update(_evaluate(eval_fn, state, data, "test", eval_bs, batch_sharding))
        if has_val and (
            meta["best_val_accuracy"] is None
            or eval_metrics["val_accuracy"] > meta["best_val_accuracy"]
        ):
            meta["best_val_accuracy"] = eval_metrics["val_accuracy"]
            meta["best_val_epoch"] = epoch
            meta["test_accuracy_at_best_val"] = eval_metrics["test_accuracy"]
        writer.write_scalars(step, {"epoch": epoch, **eval_metrics})

    eval_bs = config.train.eval_batch_size
    step = start_step
    try:
        for step in range(start_step, total_steps):
            batch = _to_global(next(batches), batch_sharding)
            state, step_metrics = train_fn(state, batch, train_key)
            pending.append(step_metrics)
            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            is_last = done == total_steps
            if done % config.train.log_every_steps == 0 or epoch_end or is_last:
                flush_train_metrics(done)
            if epoch_end:
                epoch = done // steps_per_epoch
                writer.write_scalars(done, {"epoch_time_s": time.time() - epoch_start})
                if epoch % config.train.eval_every_epochs == 0 or is_last:
                    run_eval(done, epoch)
                epoch_start = time.time()
            elif is_last:
                run_eval(done, done / steps_per_epoch)
            if preemption.reached(done):
                save(done)
                checkpointer.wait()
                writer.flush()
                logging.warning("Preempted: saved step %d; rerun the same command.", done)
                return {"preempted": True, "steps": done}
            if epoch_end or is_last or done % config.train.checkpoint_every_steps == 0:
                save(done)
        if start_step == total_steps or not eval_metrics:  # resumed a finished run
            run_eval(total_steps, total_steps / steps_per_epoch)
        checkpointer.wait()
    finally:
        progress.close()
        preemption.restore()
        writer.flush()
        checkpointer.close()

    results = {
        "test_accuracy": eval_metrics["test_accuracy"],
        "test_error": 1.0 - eval_metrics["test_accuracy"],
        "test_loss": eval_metrics["test_loss"],
        "best_val_accuracy": meta.get("best_val_accuracy"),
        "best_val_epoch": meta.get("best_val_epoch"),
        "test_error_at_best_val": (
            1.0 - meta["test_accuracy_at_best_val"] if meta.get("best_val_accuracy") else None
        ),
        "train_time_s": meta_time(),
        "steps": total_steps,
        "epochs": total_steps / steps_per_epoch,
        "final_train_loss": last["loss"] if np.isfinite(last["loss"]) else None,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "config": config.to_dict(),
        "versions": _versions(),
        "devices": _device_info(),
        "host_malloc_applied": malloc_applied,
        "command": " ".join(sys.argv),
    }
    if is_main:
        _write_json(os.path.join(workdir, "results.json"), results)
    return results
