"""The pure train and eval steps and the train state (what the benchmark and the loop compile).

* :func:`train_step` is pure: ``(state, batch, rng) -> (state, metrics)``. The step's key is
  ``fold_in(rng, state.step)`` (``rng`` is the run's fixed train key), so a resumed run draws the
  same drop gates and augmentation as an uninterrupted one. :func:`sdjax.trainer.build` compiles
  it once with ``jax.jit`` over a 1-D device mesh with axis ``"data"``: the batch is sharded
  along it, the state is replicated and donated; BatchNorm statistics are over the global batch.
* :func:`eval_step` sums loss and correct predictions over the real examples of a padded batch.
* :func:`create_train_state` initialises parameters and optimizer state (pure: jit it, or
  ``jax.eval_shape`` it to get the state's structure without computing anything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from sdjax.data import augment

__all__ = [
    "TrainState",
    "create_train_state",
    "cross_entropy",
    "drop_rate_scale",
    "eval_step",
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
    block_gates: Callable[..., jax.Array] | None = None,
    drop_warmup_steps: float = 0.0,
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
      drop_warmup_steps: > 0 scales every drop rate by :func:`drop_rate_scale` (a ramp from 0
        to 1 over this many steps); 0 trains with the configured rates from the first step.

    Returns:
      ``(new_state, {"loss", "accuracy", "learning_rate", "finite"[, "blocks_run"]})``
      (float32 scalars; loss and accuracy are batch means; ``finite`` is 1.0 when every new
      parameter, BatchNorm statistic and EMA parameter is finite, else 0.0).
    """
    step_key = jax.random.fold_in(rng, state.step)
    dropout_key = jax.random.fold_in(step_key, 0)
    augment_key = jax.random.fold_in(step_key, 1)
    images = augment.preprocess(batch["image"], augment_key, **augment_kwargs)
    labels = batch["label"]

    scale = {}
    if drop_warmup_steps > 0:
        scale = {"drop_rate_scale": drop_rate_scale(state.step, drop_warmup_steps)}

    def loss_fn(params):
        logits, new_vars = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
            **scale,
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
        "finite": _all_finite((new_state.params, new_state.batch_stats, new_state.ema_params)),
    }
    if block_gates is not None:
        gates = block_gates(dropout_key, **scale)
        metrics["blocks_run"] = jnp.sum(gates, dtype=jnp.float32)
    return new_state, metrics


def _all_finite(tree: Any) -> jax.Array:
    """1.0 (float32) when every floating leaf of ``tree`` is finite, else 0.0."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
    return jnp.asarray(ok, jnp.float32)


def drop_rate_scale(step: jax.Array | int, warmup_steps: float) -> jax.Array:
    """The drop-rate warm-up factor of ``step``: ``min(1, step / warmup_steps)``, float32.

    A pure function of the (0-based) step, so a resumed run uses the same rates. ``step = 0``
    gives 0 (no block dropped), ``step >= warmup_steps`` gives 1 (the configured rates).
    """
    return jnp.minimum(jnp.float32(1.0), jnp.asarray(step, jnp.float32) / jnp.float32(warmup_steps))


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
