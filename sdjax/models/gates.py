"""The batch-mode gates a training key draws, computed without running the model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.base import check_drop_rate_scale, scale_rate
from sdjax.ops import batch_keep

__all__ = ["batch_gates"]

Array = jax.Array


def _dropout_key(module: nn.Module) -> Array:
    return module.make_rng("dropout")


def batch_gates(model: nn.Module, key: Array, drop_rate_scale: Any = None) -> Array:
    """The batch-mode gates that ``model.apply(..., train=True, rngs={"dropout": key})`` draws.

    Computed from the key and the model's drop rates alone: no parameters and no forward pass,
    so it is cheap to call per step (e.g. to log how many blocks a step computed).

    Args:
      model: an sdjax model (:mod:`sdjax.models`), scanned or unrolled.
      key: the ``"dropout"`` PRNG key of the training step.
      drop_rate_scale: the ``drop_rate_scale`` the step passes to the model (None: none).

    Returns:
      A ``bool`` array of shape ``(model.num_blocks,)``, in forward order: ``True`` where the
      block's residual branch is computed. Blocks that cannot be dropped (rate 0, e.g.
      EfficientNet's blocks without an identity shortcut) are ``True``. With
      ``drop_mode="batch"`` these are exactly the blocks the step computes; in other modes each
      block draws its masks from the same block key instead, and this gate is not used. With a
      ``drop_rate_scale`` every rate is the float32 ``rate * drop_rate_scale`` in the model and
      here alike. Without one, a scanned block compares its float32 rate with the random bits,
      so its gate can differ from this one in the rare draws that fall between the float32 and
      float64 thresholds (probability below 1e-6 per block).
    """
    scale = check_drop_rate_scale(drop_rate_scale, type(model).__name__)
    rates = [scale_rate(rate, scale) for rate in model.effective_block_rates()]
    top = model.apply({}, rngs={"dropout": key}, method=_dropout_key)
    return jnp.stack([batch_keep(jax.random.fold_in(top, b), r) for b, r in enumerate(rates)])
