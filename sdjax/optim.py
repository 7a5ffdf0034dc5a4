"""Optimizers and learning-rate schedules from ``config.optim`` (optax).

* ``sgd``: SGD with (Nesterov) momentum; weight decay is added to the gradient as L2
  (``optax.add_decayed_weights`` before the momentum, as ``torch.optim.SGD(weight_decay=...)`` in
  the paper's code). ``weight_decay_on="all"`` decays every parameter (the paper's Torch code),
  ``"kernels"`` only conv/dense kernels (parameters named ``kernel``).
* ``rmsprop``: the EfficientNet recipe (decay 0.9, eps 1e-3, momentum 0.9) with the same L2 decay.
* ``adamw``: Adam (``adam_b1``, ``adam_b2``, ``adam_eps``) with DECOUPLED weight decay
  (``optax.adamw``: ``weight_decay * learning_rate * param`` subtracted after the Adam update,
  not added to the gradient), masked by ``weight_decay_on`` as above (DeiT / timm:
  ``"kernels"``, i.e. no decay of biases, LayerNorm parameters, position embedding, class token).
* Schedules (step -> learning rate): ``step`` (multiply by ``decay_factor`` at each fraction in
  ``boundaries`` of the total steps; the paper's /10 at 50% and 75%), ``epoch_step`` (the same
  drops by whole epochs, as the paper's ``main.lua``: 1-based epoch ``e`` of ``E`` trains at
  ``learning_rate * decay_factor ** #{b in boundaries : e >= b * E}``, e.g. for 500 epochs
  0.1 in epochs 1-249, 0.01 in 250-374, 0.001 in 375-500), ``cosine``, ``exponential``
  (``decay_factor`` every ``decay_epochs``, staircase; EfficientNet), ``constant``. An optional
  warm-up of ``warmup_steps`` (or ``warmup_epochs``) steps: ``linear`` from 0 to the base rate, or
  ``constant`` at ``warmup_factor`` times the base rate (He et al.'s 0.01 for 1202 layers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["create", "epoch_step_schedule", "learning_rate_schedule", "warmup_steps"]


def epoch_step_schedule(
    base: float,
    boundaries: tuple[float, ...],
    decay_factor: float,
    num_epochs: float,
    steps_per_epoch: int,
) -> optax.Schedule:
    """The paper's learning rate by epoch (``main.lua``): a function of the 0-based step.

    Step ``s`` lies in the 1-based epoch ``e = s // steps_per_epoch + 1``; the rate is ``base``
    times ``decay_factor`` once for every fraction ``b`` in ``boundaries`` with
    ``e >= b * num_epochs`` (Lua: ``if epochCounter < maxEpochs * 0.5 then 0.1 elseif ... <
    maxEpochs * 0.75 then 0.01 else 0.001``). The rate changes only at epoch starts, also when
    an epoch ends with a smaller batch.
    """
    thresholds = jnp.asarray([b * num_epochs for b in boundaries], jnp.float32)
    # The rates in float64 on the host, rounded once (0.1 * 0.1 ** 2 -> float32(0.001)).
    rates = jnp.asarray([base * decay_factor**k for k in range(len(boundaries) + 1)], jnp.float32)

    def schedule(step):
        epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch + 1
        return rates[jnp.sum(epoch.astype(jnp.float32) >= thresholds)]

    return schedule


def warmup_steps(optim_config: Any, steps_per_epoch: int) -> int:
    """Warm-up length in steps: ``warmup_steps`` if > 0, else ``warmup_epochs`` epochs."""
    if optim_config.warmup_steps > 0:
        return int(optim_config.warmup_steps)
    return int(round(optim_config.warmup_epochs * steps_per_epoch))


def learning_rate_schedule(
    optim_config: Any, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate as a function of the (0-based) step; see the module docstring."""
    base = float(optim_config.learning_rate)
    name = optim_config.lr_schedule
    if name == "step":
        main = optax.piecewise_constant_schedule(
            base,
            {int(b * total_steps): optim_config.decay_factor for b in optim_config.boundaries},
        )
    elif name == "epoch_step":
        main = epoch_step_schedule(
            base,
            optim_config.boundaries,
            optim_config.decay_factor,
            total_steps / steps_per_epoch,
            steps_per_epoch,
        )
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base, max(total_steps, 1))
    elif name == "exponential":
        main = optax.exponential_decay(
            base,
            transition_steps=max(int(optim_config.decay_epochs * steps_per_epoch), 1),
            decay_rate=optim_config.decay_factor,
            staircase=True,
        )
    elif name == "constant":
        main = optax.constant_schedule(base)
    else:
        raise ValueError(f"config.optim.lr_schedule={name!r} is invalid.")
    warm = warmup_steps(optim_config, steps_per_epoch)
    if warm == 0:
        return main
    if optim_config.warmup_type == "linear":
        warmup = optax.linear_schedule(0.0, base, warm)
    else:
        warmup = optax.constant_schedule(base * optim_config.warmup_factor)
    # The main schedule keeps counting from step 0 (the warm-up replaces its first steps).
    return lambda step: jnp.where(step < warm, warmup(step), main(step))


def _kernel_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def create(
    optim_config: Any, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Builds the optax optimizer for ``config.optim`` (learning rate injected as a hyperparam).

    The learning rate is stored in the optimizer state (``optax.inject_hyperparams``) so that it
    is checkpointed and reported by the train step.
    """
    schedule = learning_rate_schedule(optim_config, total_steps, steps_per_epoch)
    mask = _kernel_mask if optim_config.weight_decay_on == "kernels" else None

    @optax.inject_hyperparams
    def make(learning_rate):
        if optim_config.optimizer == "adamw":
            return optax.adamw(
                learning_rate,
                b1=optim_config.get("adam_b1", 0.9),
                b2=optim_config.get("adam_b2", 0.999),
                eps=optim_config.get("adam_eps", 1e-8),
                weight_decay=optim_config.weight_decay,
                mask=mask,
            )
        parts = []
        if optim_config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(optim_config.weight_decay, mask=mask))
        if optim_config.optimizer == "sgd":
            parts.append(
                optax.sgd(
                    learning_rate,
                    momentum=optim_config.momentum or None,
                    nesterov=bool(optim_config.nesterov),
                )
            )
        elif optim_config.optimizer == "rmsprop":
            parts.append(
                optax.rmsprop(
                    learning_rate,
                    decay=optim_config.rmsprop_decay,
                    eps=optim_config.rmsprop_eps,
                    momentum=optim_config.momentum or None,
                    nesterov=bool(optim_config.nesterov),
                )
            )
        else:
            raise ValueError(f"config.optim.optimizer={optim_config.optimizer!r} is invalid.")
        return optax.chain(*parts)

    return make(learning_rate=schedule)
