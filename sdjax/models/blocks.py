"""The residual block contract shared by the three model families, and its one residual helper.

A block is a Linen module built from factories (``ModuleDef``, as in flax's
``examples/imagenet``): ``conv`` and ``norm`` make its layers, ``drop_path`` makes the
:class:`sdjax.layers.DropPathResidual` that adds the (possibly dropped) branch to the shortcut.
The model builds the three once (:meth:`sdjax.models.base.StochasticDepthModel.block_defs`).

Blocks are called as ``block(x, rate, block_index, key, min_rate)``: ``rate`` is the block's drop
probability (a Python float, or a float32 0-d array inside ``nn.scan`` or with a
``drop_rate_scale``), ``key`` the model's stochastic-depth key (None: deterministic) and the
block's own key is ``fold_in(key, block_index)`` with the global (network-wide) block index, so
scanned and unrolled networks draw the same gates (and, in row-subset mode, the same subsets).

``min_rate`` is the static lower bound on ``rate`` that row-subset mode needs when ``rate`` is a
JAX array (it fixes the subset size; see :func:`sdjax.checks.check_min_rate`);
:func:`sdjax.models.stages.apply_stage` sets the field for every block it builds, and passes the
call argument (a Python float, static under ``nn.remat``; None: the field) to override it for a
group of scanned blocks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

__all__ = ["ModuleDef", "ResidualBlock"]

Array = jax.Array
#: A Linen module class or a ``functools.partial`` of one (a module factory).
ModuleDef = Any


class ResidualBlock(nn.Module):
    """Fields every sdjax block has, and :meth:`residual`, its skip connection.

    Attributes:
      features: output channels of the block (a bottleneck ResNet block outputs
        ``4 * features``).
      conv: convolution factory, called as ``conv(features, kernel_size, strides, ..., name=)``.
      norm: normalization factory, called as ``norm(name=...)``.
      drop_path: :class:`sdjax.layers.DropPathResidual` factory with the model's mode and
        scaling, called as ``drop_path(branch, rate=..., name=...)``.
      strides: the block's stride (1 or 2).
      min_rate: a static (Python float) lower bound on every ``rate`` the block is called with,
        passed to ``drop_path``; ``"row_subset"`` mode sizes its subset with it when ``rate`` is
        a JAX array (scanned, rematerialized or scaled blocks). None: ``rate`` must be a Python
        float in that mode.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    drop_path: ModuleDef
    strides: int = 1
    min_rate: float | None = None

    def residual(
        self,
        branch: ModuleDef,
        x: Array,
        shortcut: Array,
        rate: Any,
        block_index: Any,
        key: Array | None,
        min_rate: float | None = None,
    ) -> Array:
        """``shortcut + drop_path(branch(x))``; call from the block's compact ``__call__``.

        Args:
          branch: the residual branch's factory (it becomes ``residual/branch``).
          x: the branch input.
          shortcut: the identity or projected path, the shape of the branch output.
          rate: the block's drop probability (Python float or float32 0-d array).
          block_index: the block's global index (int or int32 0-d array).
          key: the model's stochastic-depth key; None runs the deterministic (eval) path.
          min_rate: overrides the field ``min_rate`` for this call (a group of a scanned stage,
            :func:`sdjax.models.stages.apply_stage`); None: the field.

        Returns:
          The sum, shaped and typed like ``shortcut`` (the child ``"residual"``'s output).
        """
        min_rate = self.min_rate if min_rate is None else min_rate
        return self.drop_path(branch, rate=rate, min_rate=min_rate, name="residual")(
            x,
            shortcut,
            deterministic=key is None,
            rng=None if key is None else jax.random.fold_in(key, block_index),
        )
