"""ImageNet ResNets (He et al., 2016) 18/34/50/101/152 with stochastic depth per block.

Architecture (the torchvision layout, "ResNet v1.5": the stride of a bottleneck block is on its
3x3 conv):

* stem: 7x7 conv stride 2 (64 filters), BatchNorm, ReLU, 3x3 max pooling stride 2;
* four stages with 64, 128, 256, 512 base filters; stages 2-4 start with a stride-2 block;
* basic blocks (18, 34): Conv3x3-BN-ReLU-Conv3x3-BN; bottleneck blocks (50, 101, 152):
  Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1(4x)-BN;
* projection shortcut (1x1 conv with the block's stride + BN) where the shape changes, else the
  identity; ``relu(shortcut(x) + drop_path(branch(x)))``;
* global average pooling and a dense classifier. Convolutions have no bias.

Stochastic depth as in the paper's ImageNet experiment: every block (the projection ones
included; their shortcut is always computed) gets the schedule's rate, by default the linear
decay to ``final_drop_rate = 0.5`` with batch-wise skipping and eval-time scaling. ResNet-50 has
25,557,032 parameters (1000 classes).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.base import (
    StochasticDepthModel,
    check_drop_rate_scale,
    check_input,
    model_default,
    model_key,
)
from sdjax.models.blocks import ModuleDef, ResidualBlock
from sdjax.models.stages import apply_stage

__all__ = ["ResNet", "ResNetBlock", "STAGE_SIZES"]

#: depth -> (blocks per stage, bottleneck?)
STAGE_SIZES: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}

#: Explicit padding of the 3x3 convolutions (torchvision's; differs from "SAME" at stride 2).
_PAD_3X3 = ((1, 1), (1, 1))


class _Branch(nn.Module):
    """The residual branch of a basic or bottleneck block."""

    features: int
    strides: int
    bottleneck: bool
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        conv, norm, features = self.conv, self.norm, self.features
        if self.bottleneck:
            y = nn.relu(norm(name="bn1")(conv(features, (1, 1), name="conv1")(x)))
            y = conv(features, (3, 3), self.strides, padding=_PAD_3X3, name="conv2")(y)
            y = nn.relu(norm(name="bn2")(y))
            return norm(name="bn3")(conv(4 * features, (1, 1), name="conv3")(y))
        y = conv(features, (3, 3), self.strides, padding=_PAD_3X3, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        return norm(name="bn2")(conv(features, (3, 3), padding=_PAD_3X3, name="conv2")(y))


class ResNetBlock(ResidualBlock):
    """A basic or bottleneck block with stochastic depth; projection shortcut if needed.

    Called as ``block(x, rate, block_index, key)`` (see :mod:`sdjax.models.blocks`).
    ``features`` is the base width; a bottleneck block outputs ``4 * features`` channels.
    """

    bottleneck: bool = False

    @nn.compact
    def __call__(self, x, rate, block_index, key, min_rate=None):
        out_features = 4 * self.features if self.bottleneck else self.features
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = self.conv(out_features, (1, 1), self.strides, name="proj_conv")(x)
            shortcut = self.norm(name="proj_bn")(shortcut)
        branch = functools.partial(
            _Branch, self.features, self.strides, self.bottleneck, self.conv, self.norm
        )
        return nn.relu(self.residual(branch, x, shortcut, rate, block_index, key, min_rate))


class ResNet(StochasticDepthModel):
    """ImageNet ResNet (18, 34, 50, 101, 152) with stochastic depth per block.

    Attributes:
      depth: 18, 34, 50, 101 or 152 (50).
      width: base filters of the first stage (64).
      num_classes: number of logits (1000).
      The other shared fields (keyword-only) keep the defaults of
      :class:`sdjax.models.base.StochasticDepthModel`: the paper's ImageNet setting (linear
      decay to ``final_drop_rate=0.5``, batch mode, eval-time scaling), scanned blocks,
      BatchNorm 0.9 / 1e-5.

    Call: ``model.apply(variables, x, train=..., drop_rate_scale=None, rngs={"dropout": key},
    mutable=["batch_stats"])`` with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 32``;
    returns float32 logits ``(N, num_classes)``.
    """

    depth: int = 50
    width: int = 64
    num_classes: int = model_default(1000)

    def __post_init__(self):
        if self.depth not in STAGE_SIZES or isinstance(self.depth, bool):
            raise ValueError(
                f"ResNet: depth={self.depth!r} is not valid; allowed values: "
                f"{', '.join(map(str, STAGE_SIZES))}."
            )
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"ResNet: width must be a positive integer, got {self.width!r}.")
        super().__post_init__()

    @property
    def num_blocks(self) -> int:
        """The number of residual (droppable) blocks ``L`` (16 for ResNet-50)."""
        return sum(STAGE_SIZES[self.depth][0])

    @nn.compact
    def __call__(self, x, train: bool = False, drop_rate_scale: Any = None):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``.

        ``drop_rate_scale``: None, or a float32 scalar (may be traced) multiplying every block's
        drop rate; see :func:`sdjax.models.base.scale_rate`.
        """
        x = check_input(x, model="ResNet", input_channels=self.input_channels, min_size=32)
        scale = check_drop_rate_scale(drop_rate_scale, "ResNet")
        stage_sizes, bottleneck = STAGE_SIZES[self.depth]
        rates = self.block_rates(self.num_blocks)
        key = model_key(self, train and max(rates) > 0)
        defs = self.block_defs(train)
        x = defs["conv"](self.width, (7, 7), 2, padding=((3, 3), (3, 3)), name="stem_conv")(x)
        x = nn.relu(defs["norm"](name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        first_index = 0
        for stage, num in enumerate(stage_sizes):
            block = dict(features=self.width * 2**stage, bottleneck=bottleneck, **defs)
            x = apply_stage(
                ResNetBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=dict(strides=1 if stage == 0 else 2, **block),
                rest_kwargs=block,
                rates=rates[first_index : first_index + num],
                first_index=first_index,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
                drop_rate_scale=scale,
            )
            first_index += num
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
