"""The shared base of the LayerNorm families (ViT/DeiT and ConvNeXt), with timm's conventions.

:class:`LayerNormNet` is a :class:`sdjax.models.base.StochasticDepthModel` whose defaults and
per-block rates follow the reference implementations these families are trained with (timm's
``vision_transformer.py`` and ``convnext.py``):

* ``drop_schedule="linear"`` is timm's rule :func:`linspace_rates`, ``linspace(0, rate, depth)``
  over the ``depth`` blocks (transformer layers, or all ConvNeXt blocks in forward order): the
  first block is never dropped, the last one is dropped with probability ``rate`` and the step is
  ``rate / (depth - 1)``. The stochastic depth paper's rule (:func:`sdjax.schedules.linear_decay`,
  used by the ResNets) gives block ``l = 1..L`` the rate ``rate * l / L`` instead: the first block
  ``rate / L``, the step ``rate / L``. Both end at ``rate``; timm's is slightly lower everywhere
  else. ``"uniform"`` and ``"efficientnet"`` are the rules of :mod:`sdjax.schedules` over the
  same ``depth`` blocks.
* Defaults: 1000 classes, ``final_drop_rate=0.1`` (DeiT-S; ConvNeXt-T trains with 0.1 too),
  ``drop_mode="row"`` with ``scale_by_keep=True`` (timm's ``DropPath``: per sample, kept
  samples divided by ``1 - rate``).
* Layers: ``norm`` is ``nn.LayerNorm`` (epsilon ``layer_norm_epsilon``, 1e-6 as in timm;
  statistics in float32 whatever ``dtype``), ``dense`` is ``nn.Dense`` in ``dtype`` with
  truncated-normal(0.02) kernels and zero biases, parameters float32. There is no BatchNorm:
  ``bn_momentum`` / ``bn_epsilon`` are unused, no ``batch_stats`` collection exists, and the
  branch of a block is a per-sample function, so ``drop_mode="row_subset"`` computes exactly
  what masked ``"row"`` mode computes on the same subset (no batch statistics change).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdjax import schedules
from sdjax.checks import check_rate
from sdjax.layers import DropPathResidual
from sdjax.models.base import (
    StochasticDepthModel,
    _check_positive_int,
    _check_real,
    model_default,
)
from sdjax.models.conv_norm import Conv

__all__ = ["LayerNormNet", "gelu", "layer_scale", "linspace_rates", "trunc_normal"]

#: timm's ``trunc_normal_(std=0.02)`` (truncated at two standard deviations).
trunc_normal = nn.initializers.truncated_normal(0.02)


def gelu(x):
    """The exact (erf) GELU of ``torch.nn.GELU()``, which timm's ViT and ConvNeXt use."""
    return nn.gelu(x, approximate=False)


def linspace_rates(num_blocks: int, rate: float) -> tuple[float, ...]:
    """timm's per-block drop rates: ``linspace(0, rate, num_blocks)``.

    Args:
      num_blocks: the number of blocks ``L`` (>= 0).
      rate: the last block's drop probability (timm's ``drop_path_rate``), in ``[0, 1]``.

    Returns:
      ``L`` rates ``rate * b / (L - 1)`` for ``b = 0..L-1``: 0 for the first block, ``rate`` for
      the last; ``(0.0,)`` for one block (as ``torch.linspace(0, rate, 1)``), ``()`` for none.
    """
    rate = check_rate(rate, "rate")
    num_blocks = len(schedules.uniform(num_blocks, 0.0))  # validates num_blocks
    if num_blocks == 1:
        return (0.0,)
    return tuple(rate * b / (num_blocks - 1) for b in range(num_blocks))


class LayerNormNet(StochasticDepthModel):
    """Base of :class:`~sdjax.models.vit.ViT` and :class:`~sdjax.models.convnext.ConvNeXt`.

    Attributes:
      layer_scale_init: LayerScale (CaiT; DINOv2, ConvNeXt): each branch output is multiplied
        by a learned per-channel vector initialised to this value. None (or 0): no LayerScale.
      layer_norm_epsilon: epsilon of every LayerNorm (1e-6).
      subset_scan_groups: ``drop_mode="row_subset"`` with ``scan_blocks``: the scanned blocks
        of a stage run in training as up to this many consecutive scans over slices of the
        same stacked parameters (:func:`sdjax.models.stages.subset_groups`), each padded to its
        own largest subset instead of the stage's; the result and the parameter layout are the
        same, the compiled step has one scan body per group. 1: one scan (every scanned block
        runs on the subset of the stage's lowest rate). Unused in the other modes.
      The shared fields (keyword-only) are those of
      :class:`sdjax.models.base.StochasticDepthModel`, with timm's defaults here:
      ``num_classes=1000``, ``final_drop_rate=0.1``, ``drop_mode="row"``,
      ``scale_by_keep=True``; ``drop_schedule="linear"`` means :func:`linspace_rates` (see the
      module docstring for how it differs from the paper's rule).

    Subclasses define ``num_layers`` (a field or property: the number of blocks the schedule
    runs over) and ``num_blocks`` (the number of residual branches,
    :meth:`effective_block_rates`).
    """

    layer_scale_init: float | None = None
    layer_norm_epsilon: float = 1e-6
    subset_scan_groups: int = 4
    num_classes: int = model_default(1000)
    final_drop_rate: float = model_default(0.1)
    drop_mode: str = model_default("row")
    scale_by_keep: bool = model_default(True)

    def __post_init__(self):
        try:
            if self.layer_scale_init is not None:
                _check_real(self.layer_scale_init, "layer_scale_init", 0.0, 1e30, ">= 0 or None")
            _check_real(self.layer_norm_epsilon, "layer_norm_epsilon", 1e-30, 1e30, "> 0")
            _check_positive_int(self.subset_scan_groups, "subset_scan_groups")
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        super().__post_init__()

    def block_rates(self, num_blocks: int) -> tuple[float, ...]:
        """The schedule's rates of ``num_blocks`` blocks; ``"linear"`` is :func:`linspace_rates`."""
        if self.drop_schedule == "linear":
            return linspace_rates(num_blocks, self.final_drop_rate)
        return super().block_rates(num_blocks)

    def stage_subset_groups(self) -> int:
        """``max_subset_groups`` of :func:`sdjax.models.stages.apply_stage`: 1 unless row-subset."""
        return self.subset_scan_groups if self.drop_mode == "row_subset" else 1

    def layer_rates(self) -> tuple[float, ...]:
        """The drop rate of each of the ``num_layers`` blocks, in forward order."""
        return self.block_rates(self.num_layers)

    def block_defs(self, train: bool) -> dict[str, Any]:
        """The ``conv``, ``dense``, ``norm`` and ``drop_path`` factories of the blocks.

        ``conv``: :class:`~sdjax.models.conv_norm.Conv` in ``dtype`` with ``conv_impl``, a bias
        and truncated-normal(0.02) kernels; ``dense``: ``nn.Dense`` likewise; ``norm``:
        ``nn.LayerNorm`` (``layer_norm_epsilon``); ``drop_path``:
        :class:`sdjax.layers.DropPathResidual` with ``drop_mode``, ``scale_by_keep`` and
        ``num_shards=drop_shards``. ``train`` is unused (LayerNorm behaves the same in both).
        """
        del train
        return dict(
            conv=functools.partial(
                Conv, dtype=self.dtype, impl=self.conv_impl, use_bias=True, kernel_init=trunc_normal
            ),
            dense=functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal),
            norm=functools.partial(nn.LayerNorm, epsilon=self.layer_norm_epsilon, dtype=self.dtype),
            drop_path=functools.partial(
                DropPathResidual,
                mode=self.drop_mode,
                scale_by_keep=self.scale_by_keep,
                num_shards=self.drop_shards,
            ),
        )


def layer_scale(module: nn.Module, x, init: float | None):
    """``x * gamma`` with a learned per-channel ``gamma`` (param ``"layer_scale"``, float32,
    initialised to ``init``), in ``x``'s dtype; ``x`` itself when ``init`` is None or 0.

    Call from the compact ``__call__`` of a branch (``module``).
    """
    if not init:
        return x
    gamma = module.param("layer_scale", nn.initializers.constant(init), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)
