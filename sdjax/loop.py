"""The training loop: train, evaluate, checkpoint, write metrics and ``results.json``.

:func:`train_and_evaluate` builds the run (:func:`sdjax.trainer.build`: every check before
anything compiles), resumes from ``workdir/checkpoints`` if there is a checkpoint, trains,
evaluates every ``eval_every_epochs`` epochs (test error at the best validation epoch, as in
the paper), checkpoints periodically and on SIGTERM, stops on a NaN/inf loss or state without
saving it, and writes ``workdir/results.json``. What changes over the loop lives in one
:class:`LoopState`; metric buffering, evaluation, saving and the results are the named
functions below, which share one :class:`Run` (the trainer, the loop state, the writers).

What a rerun reproduces: the same config, seed and device count give bitwise-identical train
states (every checkpoint), ``metrics.jsonl`` records without the wall-clock fields
(:data:`TIMING_METRICS`) and ``results.json`` without :data:`INVOCATION_RESULTS`; a run killed at
any point and rerun with the same command ends with the same train state, per-step train
metrics and results as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import sdjax
from sdjax import runtime
from sdjax import trainer as trainer_lib
from sdjax.preemption import Preemption

__all__ = ["TIMING_METRICS", "INVOCATION_RESULTS", "LoopState", "Run", "train_and_evaluate"]

TIMING_METRICS = ("examples_per_s", "epoch_time_s")
"""Wall-clock fields of ``metrics.jsonl`` records (the only ones that differ between reruns)."""
INVOCATION_RESULTS = ("train_time_s", "command", "host_malloc_applied")
"""Fields of ``results.json`` that depend on the invocation, not on the run's numbers."""


@dataclasses.dataclass
class LoopState:
    """What changes over the loop, besides the train state.

    Attributes:
      pending: step metrics (device arrays) not yet fetched.
      logged_step / logged_time: step and wall time of the last metrics flush.
      train_loss: mean train loss of the last flushed window (survives a resume).
      best: ``best_val_accuracy``, ``best_val_epoch``, ``test_accuracy_at_best_val``.
      eval_metrics: the latest evaluation (``test_accuracy``, ``test_loss``, ``val_*``).
      epoch_train: sums over this epoch's flushed steps (``loss``, ``accuracy``, ``steps``),
        for the progress line.
      time_offset: training time of earlier (interrupted) runs, seconds.
      run_start / epoch_start: wall times.
    """

    logged_step: int
    train_loss: float | None = None
    best: dict[str, Any] = dataclasses.field(default_factory=dict)
    time_offset: float = 0.0
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch_train: dict[str, float] = dataclasses.field(default_factory=dict)
    logged_time: float = dataclasses.field(default_factory=time.time)
    run_start: float = dataclasses.field(default_factory=time.time)
    epoch_start: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def resume(cls, meta: dict[str, Any], step: int) -> LoopState:
        """The loop state after a restore of checkpoint ``meta`` at ``step`` (``{}``: fresh)."""
        best = {k: meta[k] for k in ("best_val_accuracy", "best_val_epoch") if k in meta}
        best.update({k: meta[k] for k in ("test_accuracy_at_best_val",) if k in meta})
        return cls(
            step,
            meta.get("train_loss"),
            best,
            float(meta.get("train_time_s") or 0.0),
            eval_metrics=dict(meta.get("eval_metrics") or {}),
        )

    def train_time(self) -> float:
        return self.time_offset + time.time() - self.run_start


@dataclasses.dataclass
class Run:
    """What the loop's helpers share.

    Attributes:
      trainer: what :func:`sdjax.trainer.build` made (its ``state`` advances over the loop).
      loop: the :class:`LoopState`.
      writer: the metric writer (``metrics.jsonl``, TensorBoard; ``sdjax.metrics``).
      progress: the progress bar / progress lines (``sdjax.metrics.ProgressBar``).
    """

    trainer: trainer_lib.Trainer
    loop: LoopState
    writer: Any
    progress: Any


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    command: str | None = None,
    preemption: Preemption | None = None,
) -> dict[str, Any]:
    """Trains and evaluates ``config``, resuming from ``workdir/checkpoints`` if present.

    Writes ``workdir/metrics.jsonl``, TensorBoard events in ``workdir/tensorboard``,
    checkpoints in ``workdir/checkpoints`` and, when training is complete,
    ``workdir/results.json`` (returned as a dict). A complete run rerun returns its
    ``results.json`` unchanged. After SIGTERM (at any time, also while building) the current
    step is saved and ``{"preempted": True, "steps": step, "saved": bool}`` is returned
    (``saved`` is False when no step had run yet: the workdir then holds what it held).

    Args:
      config: see ``sdjax.config.default_config``; one that asks for CPU devices or
        ``jax.distributed`` needs ``sdjax.runtime.setup(config)`` first.
      workdir: the run's directory (created if missing).
      command: the command line to record in ``results.json``.
      preemption: an installed SIGTERM handler (default: one installed now).

    Raises:
      ValueError: see ``sdjax.trainer.build`` (raised before anything is compiled).
      FloatingPointError: a NaN/inf loss or train state (the last good checkpoint is kept).
    """
    own = preemption is None
    preemption = Preemption(install=not config.train.distributed) if own else preemption
    trainer = None
    try:
        trainer = trainer_lib.build(config, workdir)
        start, total, steps_per_epoch = (
            trainer.start_step,
            trainer.total_steps,
            trainer.steps_per_epoch,
        )
        finished = read_results(workdir, total) if start == total else None
        if finished is not None or preemption.reached(start):
            return finished or {"preempted": True, "steps": start, "saved": False}
        from sdjax import metrics as metrics_lib  # noqa: PLC0415

        is_main = jax.process_index() == 0
        tensorboard = config.train.get("tensorboard", True)  # clu and TensorFlow only if True
        writer = metrics_lib.create_writer(workdir, is_main, start, tensorboard)
        progress = metrics_lib.ProgressBar(
            total, start, steps_per_epoch, config.train.progress_bar, show=is_main
        )
        if is_main and start == 0:
            _write_json(os.path.join(workdir, "config.json"), config.to_dict())
        progress.message(_start_line(trainer, start))
        loop = LoopState.resume(trainer.meta, start)
        run = Run(trainer, loop, writer, progress)
        batches = trainer.data.train_iterator(
            config.seed, start, config.train.batch_size, jax.process_index(), jax.process_count()
        )
        try:
            for step in range(start, total):
                batch = _to_global(next(batches), trainer.batch_sharding)
                trainer.state, metrics = trainer.train_fn(trainer.state, batch, trainer.train_key)
                loop.pending.append(metrics)
                done = step + 1
                epoch_end, is_last = done % steps_per_epoch == 0, done == total
                if done % config.train.log_every_steps == 0 or epoch_end or is_last:
                    flush_metrics(run, done)
                if epoch_end:
                    seconds = time.time() - loop.epoch_start
                    writer.write_scalars(done, {"epoch_time_s": seconds})
                    if (done // steps_per_epoch) % config.train.eval_every_epochs == 0 or is_last:
                        evaluate(run, done, done // steps_per_epoch)
                    progress.epoch_end(done, _epoch_scalars(loop), seconds)
                    loop.epoch_train, loop.epoch_start = {}, time.time()
                elif is_last:
                    evaluate(run, done, done / steps_per_epoch)
                    progress.epoch_end(done, _epoch_scalars(loop), time.time() - loop.epoch_start)
                if preemption.reached(done):
                    save(run, done)
                    logging.warning("Preempted: saved step %d; rerun the same command.", done)
                    return {"preempted": True, "steps": done, "saved": True}
                if epoch_end or is_last or done % config.train.checkpoint_every_steps == 0:
                    save(run, done)
            if not loop.eval_metrics:  # resumed a run that was saved at its last step
                evaluate(run, total, total / steps_per_epoch)
            trainer.checkpointer.wait()
        finally:
            progress.close()
            writer.flush()
        results = make_results(run, command)
        if is_main:
            _write_json(os.path.join(workdir, "results.json"), results)
        return results
    finally:
        if trainer is not None:
            trainer.checkpointer.close()
        if own:
            preemption.restore()


def _to_global(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
    """This host's slice of a batch -> global arrays sharded on the ``"data"`` axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def flush_metrics(run: Run, step: int) -> None:
    """Fetches the pending step metrics, stops on a NaN/inf loss or state, writes their means.

    Raises:
      FloatingPointError: a pending step had a non-finite loss or produced a non-finite state.
    """
    trainer, loop = run.trainer, run.loop
    if not loop.pending:
        return
    values = jax.device_get(loop.pending)
    loop.pending.clear()
    losses = np.array([v["loss"] for v in values])
    good = np.isfinite(losses) & (np.array([v["finite"] for v in values]) == 1.0)
    if not good.all():
        bad = step - len(values) + int(np.argmin(good)) + 1
        what = f"loss {losses[~good][0]}" if not np.isfinite(losses).all() else "non-finite state"
        raise FloatingPointError(
            f"training became non-finite at step {bad} ({what}, nan/inf); stopping without "
            f"saving. The last good checkpoint (step {trainer.checkpointer.latest_step()}) is "
            f"kept in {trainer.checkpointer.directory}. Lower config.optim.learning_rate or "
            "check the data."
        )
    now = time.time()
    loop.train_loss = float(losses.mean())
    scalars = {
        "train_loss": loop.train_loss,
        "train_accuracy": float(np.mean([v["accuracy"] for v in values])),
        "learning_rate": float(values[-1]["learning_rate"]),
        "examples_per_s": (step - loop.logged_step)
        * trainer.config.train.batch_size
        / max(now - loop.logged_time, 1e-9),
    }
    if "blocks_run" in values[0]:  # batch-mode stochastic depth: blocks computed per step
        scalars["train_blocks_run"] = float(np.mean([v["blocks_run"] for v in values]))
    loop.logged_step, loop.logged_time = step, now
    for name, value in (("loss", losses.sum()), ("accuracy", scalars["train_accuracy"])):
        weight = 1.0 if name == "loss" else len(values)
        loop.epoch_train[name] = loop.epoch_train.get(name, 0.0) + float(value) * weight
    loop.epoch_train["steps"] = loop.epoch_train.get("steps", 0.0) + len(values)
    run.writer.write_scalars(step, scalars)
    run.progress.update(step, loss=scalars["train_loss"])


def _start_line(trainer, start: int) -> str:
    """What the run is about to do: where it starts and on which devices."""
    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform} device(s), {jax.process_count()} process(es)"
    steps_per_epoch = trainer.steps_per_epoch
    if start == 0:
        return f"training {trainer.total_steps} steps ({steps_per_epoch} per epoch) on {where}"
    return (
        f"resumed from the checkpoint at step {start} (epoch {start / steps_per_epoch:g}) of "
        f"{trainer.total_steps}, on {where}"
    )


def _epoch_scalars(loop: LoopState) -> dict[str, float]:
    """This epoch's mean train loss and accuracy, then the latest evaluation's accuracies."""
    out = {}
    if loop.epoch_train.get("steps"):
        out["train_loss"] = loop.epoch_train["loss"] / loop.epoch_train["steps"]
        out["train_accuracy"] = loop.epoch_train["accuracy"] / loop.epoch_train["steps"]
    out.update({k: v for k, v in loop.eval_metrics.items() if k.endswith("_accuracy")})
    return out


def _evaluate_split(trainer, split: str) -> dict[str, float]:
    totals = None
    batches = trainer.data.eval_batches(
        split, trainer.config.train.eval_batch_size, jax.process_index(), jax.process_count()
    )
    for batch in batches:
        out = trainer.eval_fn(trainer.state, _to_global(batch, trainer.batch_sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        return {}
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        f"{split}_accuracy": float(totals["correct"]) / count,
        f"{split}_loss": float(totals["loss_sum"]) / count,
    }


def evaluate(run: Run, step: int, epoch: float) -> None:
    """Evaluates validation (if any) and test, updates the best-validation bookkeeping."""
    trainer, loop = run.trainer, run.loop
    has_val = len(trainer.data.val[1]) > 0
    loop.eval_metrics = _evaluate_split(trainer, "val") if has_val else {}
    loop.eval_metrics.update(_evaluate_split(trainer, "test"))
    best = loop.best.get("best_val_accuracy")
    if has_val and (best is None or loop.eval_metrics["val_accuracy"] > best):
        loop.best = {
            "best_val_accuracy": loop.eval_metrics["val_accuracy"],
            "best_val_epoch": epoch,
            "test_accuracy_at_best_val": loop.eval_metrics["test_accuracy"],
        }
    run.writer.write_scalars(step, {"epoch": epoch, **loop.eval_metrics})


def save(run: Run, step: int) -> None:
    """Checks the pending steps (never save a non-finite state), then checkpoints ``step``."""
    flush_metrics(run, step)
    trainer, loop = run.trainer, run.loop
    meta = {
        **loop.best,
        "eval_metrics": loop.eval_metrics,
        "train_time_s": loop.train_time(),
        "train_loss": loop.train_loss,
        "config": json.loads(json.dumps(trainer.config.to_dict(), default=str)),
    }
    trainer.checkpointer.save(step, trainer.state, meta)


def read_results(workdir: str, total_steps: int) -> dict[str, Any] | None:
    """The complete ``results.json`` of a run of ``total_steps`` steps in ``workdir``, or None."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    complete = isinstance(results, dict) and "test_accuracy" in results
    return results if complete and results.get("steps") == total_steps else None


def make_results(run: Run, command: str | None) -> dict[str, Any]:
    """The ``results.json`` payload of a finished run."""
    trainer, loop = run.trainer, run.loop
    config, total, best = trainer.config, trainer.total_steps, loop.best
    return {
        "test_accuracy": loop.eval_metrics["test_accuracy"],
        "test_error": 1.0 - loop.eval_metrics["test_accuracy"],
        "test_loss": loop.eval_metrics["test_loss"],
        "best_val_accuracy": best.get("best_val_accuracy"),
        "best_val_epoch": best.get("best_val_epoch"),
        "test_error_at_best_val": (
            1.0 - best["test_accuracy_at_best_val"] if "test_accuracy_at_best_val" in best else None
        ),
        "train_time_s": loop.train_time(),
        "steps": total,
        "epochs": total / trainer.steps_per_epoch,
        "final_train_loss": loop.train_loss,
        "num_params": int(sum(x.size for x in jax.tree.leaves(trainer.state.params))),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "versions": _versions(),
        "devices": _device_info(),
        "host_malloc_applied": runtime.host_malloc_applied(),
        "command": command,
    }


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
