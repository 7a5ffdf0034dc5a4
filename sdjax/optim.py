"""Optimizers and learning-rate schedules from ``config.optim`` (optax).

* ``sgd``: SGD with (Nesterov) momentum; weight decay is added to the gradient as L2
  (``optax.add_decayed_weights`` before the momentum, as ``torch.optim.SGD(weight_decay=...)`` in
  the paper's code). ``weight_decay_on="all"`` decays every parameter (the paper's Torch code),
  ``"kernels"`` only conv/dense kernels (parameters named ``kernel``).
* ``rmsprop``: the EfficientNet recipe (decay 0.9, eps 1e-3, momentum 0.9) with the same L2 decay.
* Schedules (step -> learning rate): ``step`` (multiply by ``decay_factor`` at each fraction in
  ``boundaries`` of the total steps; the paper's /10 at 50% and 75%), ``cosine``, ``exponential``
  (``decay_factor`` every ``decay_epochs``, staircase; EfficientNet), ``constant``. An optional
  warm-up of ``warmup_steps`` (or ``warmup_epochs``) steps: ``linear`` from 0 to the base rate, or
  ``constant`` at ``warmup_factor`` times the base rate (He et al.'s 0.01 for 1202 layers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["create", "learning_rate_schedule", "warmup_steps"]


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
