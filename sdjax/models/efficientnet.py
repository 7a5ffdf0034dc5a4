"""EfficientNet B0-B7 (Tan & Le, 2019) with drop connect (stochastic depth) as in the reference.

Follows the reference TensorFlow implementation (``tensorflow/tpu``,
``models/official/efficientnet``):

* stem: 3x3 conv stride 2 (``round_filters(32)``), BatchNorm, SiLU;
* seven stages of MBConv blocks (table :data:`BLOCKS`: kernel, input and output filters, expand
  ratio, stride, repeats). Filters are scaled by the variant's width coefficient and rounded to
  multiples of 8 (:func:`round_filters`); repeats are scaled by the depth coefficient and rounded
  up (:func:`round_repeats`). The first block of a stage has the stage's stride and input
  filters, the others stride 1 and the output filters;
* MBConv: 1x1 expansion conv + BN + SiLU (omitted when the expand ratio is 1), depthwise kxk conv
  + BN + SiLU, squeeze-excitation (reduced to ``max(1, int(0.25 * block input filters))``, 1x1
  convs with bias, SiLU then sigmoid), 1x1 projection conv + BN (no activation);
* a block with stride 1 and equal input/output filters adds its input (identity shortcut) and
  only such blocks are dropped, block ``b = 0..L-1`` (counted over all ``L`` blocks) at rate
  ``drop_connect_rate * b / L`` (``final_drop_rate`` here, schedule ``"efficientnet"``), per sample
  with train-time scaling by default;
* head: 1x1 conv (``round_filters(1280)``) + BN + SiLU, global average pooling, dropout
  (0.2 ... 0.5 by variant), dense classifier.

BatchNorm uses momentum 0.99 and epsilon 1e-3. EfficientNet-B0 has 5,288,548 parameters
(1000 classes).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.checks import check_rate
from sdjax.layers import Dropout
from sdjax.models.base import (
    StochasticDepthModel,
    check_drop_rate_scale,
    check_input,
    model_default,
    model_key,
)
from sdjax.models.blocks import ModuleDef, ResidualBlock
from sdjax.models.stages import apply_stage

__all__ = [
    "BLOCKS",
    "VARIANTS",
    "EfficientNet",
    "MBConvBlock",
    "Variant",
    "round_filters",
    "round_repeats",
]


class StageSpec(NamedTuple):
    kernel_size: int
    in_filters: int
    out_filters: int
    expand_ratio: int
    strides: int
    repeats: int


#: The B0 baseline: kernel, in, out, expand ratio, stride, repeats (SE ratio 0.25 everywhere).
BLOCKS: tuple[StageSpec, ...] = (
    StageSpec(3, 32, 16, 1, 1, 1),
    StageSpec(3, 16, 24, 6, 2, 2),
    StageSpec(5, 24, 40, 6, 2, 2),
    StageSpec(3, 40, 80, 6, 2, 3),
    StageSpec(5, 80, 112, 6, 1, 3),
    StageSpec(5, 112, 192, 6, 2, 4),
    StageSpec(3, 192, 320, 6, 1, 1),
)


class Variant(NamedTuple):
    width_coefficient: float
    depth_coefficient: float
    image_size: int
    dropout_rate: float


#: name -> (width coefficient, depth coefficient, resolution, head dropout rate).
VARIANTS: dict[str, Variant] = {
    "b0": Variant(1.0, 1.0, 224, 0.2),
    "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3),
    "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4),
    "b5": Variant(1.6, 2.2, 456, 0.4),
    "b6": Variant(1.8, 2.6, 528, 0.5),
    "b7": Variant(2.0, 3.1, 600, 0.5),
}

SE_RATIO = 0.25
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    """Scales ``filters`` by the width coefficient, rounded to a multiple of ``divisor``.

    Rounds to the nearest multiple (at least ``divisor``) and adds ``divisor`` if that lost more
    than 10%, as in the reference implementation.
    """
    filters = filters * width_coefficient
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """Scales a stage's number of blocks by the depth coefficient, rounding up."""
    return int(math.ceil(depth_coefficient * repeats))


# Reference initializers: convs He normal (fan out); dense uniform(+-1/sqrt(num_outputs)).
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class _MBConvBranch(nn.Module):
    """Expansion, depthwise conv, squeeze-excitation and projection of an MBConv block."""

    features: int
    kernel_size: int
    strides: int
    expand_ratio: int
    se_ratio: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        conv, norm = self.conv, self.norm
        in_features = x.shape[-1]
        expanded = in_features * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.silu(norm(name="expand_bn")(conv(expanded, (1, 1), name="expand_conv")(y)))
        kernel = (self.kernel_size, self.kernel_size)
        y = conv(expanded, kernel, self.strides, feature_group_count=expanded, name="dw_conv")(y)
        y = nn.silu(norm(name="dw_bn")(y))
        if self.se_ratio:
            reduced = max(1, int(in_features * self.se_ratio))
            s = jnp.mean(y, axis=(1, 2), keepdims=True)
            s = nn.silu(conv(reduced, (1, 1), use_bias=True, name="se_reduce")(s))
            s = nn.sigmoid(conv(expanded, (1, 1), use_bias=True, name="se_expand")(s))
            y = y * s
        return norm(name="project_bn")(conv(self.features, (1, 1), name="project_conv")(y))


class MBConvBlock(ResidualBlock):
    """An MBConv block; with an identity shortcut (stride 1, equal filters) it can be dropped.

    Called as ``block(x, rate, block_index, key)`` (see :mod:`sdjax.models.blocks`); a block
    without an identity shortcut is just its branch and ignores ``rate``.
    """

    kernel_size: int = 3
    expand_ratio: int = 6
    se_ratio: float = SE_RATIO

    @nn.compact
    def __call__(self, x, rate, block_index, key, min_rate=None):
        branch = functools.partial(
            _MBConvBranch,
            self.features,
            self.kernel_size,
            self.strides,
            self.expand_ratio,
            self.se_ratio,
            self.conv,
            self.norm,
        )
        if self.strides != 1 or x.shape[-1] != self.features:
            return branch()(x)
        return self.residual(branch, x, x, rate, block_index, key, min_rate)


class EfficientNet(StochasticDepthModel):
    """EfficientNet (B0 by default; the registry sets the variant coefficients).

    Attributes:
      width_coefficient / depth_coefficient: the variant's scaling (1.0 / 1.0 for B0).
      image_size: the variant's training resolution (224 for B0); informational, any size
        ``>= 32`` is accepted.
      dropout_rate: dropout before the classifier (0.2 for B0; not scaled by
        ``drop_rate_scale``).
      The shared fields (keyword-only) are those of
      :class:`sdjax.models.base.StochasticDepthModel`, with the reference's defaults here:
      ``num_classes=1000``, ``final_drop_rate=0.2`` (the reference ``drop_connect_rate``),
      ``drop_schedule="efficientnet"`` (``rate * b / L``; rates apply to identity-shortcut
      blocks only), ``drop_mode="row"``, ``scale_by_keep=True``, BatchNorm 0.99 / 1e-3.

    Call: ``model.apply(variables, x, train=..., drop_rate_scale=None, rngs={"dropout": key},
    mutable=["batch_stats"])`` with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 32``;
    returns float32 logits ``(N, num_classes)``.
    """

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    dropout_rate: float = 0.2
    num_classes: int = model_default(1000)
    final_drop_rate: float = model_default(0.2)
    drop_schedule: str = model_default("efficientnet")
    drop_mode: str = model_default("row")
    scale_by_keep: bool = model_default(True)
    bn_momentum: float = model_default(0.99)
    bn_epsilon: float = model_default(1e-3)

    def __post_init__(self):
        for field in ("width_coefficient", "depth_coefficient"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"EfficientNet: {field} must be a positive number, got {value!r}.")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"EfficientNet: image_size must be an int, got {self.image_size!r}.")
        try:
            check_rate(self.dropout_rate, "dropout_rate")
        except ValueError as err:
            raise ValueError(f"EfficientNet: {err}") from None
        super().__post_init__()

    def stages(self) -> list[StageSpec]:
        """The scaled stage table (rounded filters and repeats) of this variant."""
        return [
            StageSpec(
                spec.kernel_size,
                round_filters(spec.in_filters, self.width_coefficient),
                round_filters(spec.out_filters, self.width_coefficient),
                spec.expand_ratio,
                spec.strides,
                round_repeats(spec.repeats, self.depth_coefficient),
            )
            for spec in BLOCKS
        ]

    @property
    def num_blocks(self) -> int:
        """The number of MBConv blocks ``L`` (16 for B0); not all of them can be dropped."""
        return sum(spec.repeats for spec in self.stages())

    def effective_block_rates(self) -> tuple[float, ...]:
        """The schedule's per-block rates, 0.0 for blocks without an identity shortcut.

        Only blocks with an identity shortcut are dropped: the first block of a stage is one only
        if its stride is 1 and it keeps the number of filters (the others always are).
        """
        rates = list(self.block_rates(self.num_blocks))
        first_index = 0
        for spec in self.stages():
            if spec.strides != 1 or spec.in_filters != spec.out_filters:
                rates[first_index] = 0.0
            first_index += spec.repeats
        return tuple(rates)

    @nn.compact
    def __call__(self, x, train: bool = False, drop_rate_scale: Any = None):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``.

        ``drop_rate_scale``: None, or a float32 scalar (may be traced) multiplying every block's
        drop rate; see :func:`sdjax.models.base.scale_rate`.
        """
        x = check_input(x, model="EfficientNet", input_channels=self.input_channels, min_size=32)
        scale = check_drop_rate_scale(drop_rate_scale, "EfficientNet")
        stages = self.stages()
        num_blocks = sum(spec.repeats for spec in stages)
        rates = list(self.effective_block_rates())
        key = model_key(self, train and (max(rates) > 0 or self.dropout_rate > 0))
        defs = self.block_defs(train)
        conv, norm = defs["conv"], defs["norm"]
        stem_filters = round_filters(STEM_FILTERS, self.width_coefficient)
        x = nn.silu(norm(name="stem_bn")(conv(stem_filters, (3, 3), 2, name="stem_conv")(x)))
        first_index = 0
        for stage, spec in enumerate(stages):
            block = dict(
                features=spec.out_filters,
                kernel_size=spec.kernel_size,
                expand_ratio=spec.expand_ratio,
                se_ratio=SE_RATIO,
                **defs,
            )
            x = apply_stage(
                MBConvBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=dict(strides=spec.strides, **block),
                rest_kwargs=block,
                rates=rates[first_index : first_index + spec.repeats],
                first_index=first_index,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
                drop_rate_scale=scale,
            )
            first_index += spec.repeats
        head_filters = round_filters(HEAD_FILTERS, self.width_coefficient)
        x = nn.silu(norm(name="head_bn")(conv(head_filters, (1, 1), name="head_conv")(x)))
        x = jnp.mean(x, axis=(1, 2))
        x = Dropout(rate=self.dropout_rate, name="head_dropout")(
            x,
            deterministic=key is None,
            rng=None if key is None else jax.random.fold_in(key, num_blocks),
        )
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_dense_init, name="head")(x)
        return x.astype(jnp.float32)
