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

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.common import (
    Conv,
    StochasticDepthFields,
    apply_stage,
    batch_norm,
    check_input,
    model_key,
    relu_residual,
)

__all__ = ["ResNet", "ResNetBlock", "STAGE_SIZES"]

#: depth -> (blocks per stage, bottleneck?)
STAGE_SIZES: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


class _Branch(nn.Module):
    """The residual branch of a basic or bottleneck block."""

    features: int
    strides: int
    bottleneck: bool
    train: bool
    bn_momentum: float
    bn_epsilon: float
    dtype: Any
    conv_impl: str

    @nn.compact
    def __call__(self, x):
        def conv(features, kernel, strides, name):
            padding = "SAME" if kernel == 1 else ((1, 1), (1, 1))
            return Conv(
                features,
                (kernel, kernel),
                strides,
                padding=padding,
                dtype=self.dtype,
                impl=self.conv_impl,
                name=name,
            )

        def norm(name):
            return batch_norm(
                self.train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                name=name,
            )

        if self.bottleneck:
            y = nn.relu(norm("bn1")(conv(self.features, 1, 1, "conv1")(x)))
            y = nn.relu(norm("bn2")(conv(self.features, 3, self.strides, "conv2")(y)))
            return norm("bn3")(conv(4 * self.features, 1, 1, "conv3")(y))
        y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, "conv1")(x)))
        return norm("bn2")(conv(self.features, 3, 1, "conv2")(y))


class ResNetBlock(nn.Module):
    """A basic or bottleneck block with stochastic depth; projection shortcut if needed.

    Called as ``block(x, rate, block_index, key)`` (see
    :class:`sdjax.models.cifar_resnet.CifarResNetBlock`). ``features`` is the base width; a
    bottleneck block outputs ``4 * features`` channels.
    """

    features: int
    strides: int = 1
    bottleneck: bool = False
    train: bool = False
    drop_mode: str = "batch"
    scale_by_keep: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, rate, block_index, key):
        out_features = 4 * self.features if self.bottleneck else self.features
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = Conv(
                out_features,
                (1, 1),
                self.strides,
                dtype=self.dtype,
                impl=self.conv_impl,
                name="proj_conv",
            )(x)
            shortcut = batch_norm(
                self.train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                name="proj_bn",
            )(shortcut)
        branch = _Branch(
            self.features,
            self.strides,
            self.bottleneck,
            self.train,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            self.conv_impl,
        )
        return relu_residual(self, branch, x, shortcut, rate, block_index, key)


class ResNet(nn.Module, StochasticDepthFields):
    """ImageNet ResNet (18, 34, 50, 101, 152) with stochastic depth per block.

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      num_classes: number of logits (1000).
      final_drop_rate: drop rate of the last block (0.5, the paper's ImageNet setting; 0 =
        constant depth).
      drop_schedule: ``"linear"`` (paper), ``"uniform"`` or ``"efficientnet"``.
      drop_mode: ``"batch"`` (paper) or ``"row"``.
      scale_by_keep: False (paper: eval-time scaling by ``1 - rate``).
      scan_blocks / remat / dtype / conv_impl / input_channels: see
        :class:`sdjax.models.common.StochasticDepthFields`.
      width: base filters of the first stage (64).
      bn_momentum / bn_epsilon: BatchNorm (0.9 / 1e-5).

    Call: ``model.apply(variables, x, train=..., rngs={"dropout": key},
    mutable=["batch_stats"])`` with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 32``;
    returns float32 logits ``(N, num_classes)``.
    """

    depth: int = 50
    num_classes: int = 1000
    final_drop_rate: float = 0.5
    drop_schedule: str = "linear"
    drop_mode: str = "batch"
    scale_by_keep: bool = False
    scan_blocks: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    input_channels: int = 3
    width: int = 64
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        if self.depth not in STAGE_SIZES or isinstance(self.depth, bool):
            raise ValueError(
                f"ResNet: depth={self.depth!r} is not valid; allowed values: "
                f"{', '.join(map(str, STAGE_SIZES))}."
            )
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"ResNet: width must be a positive integer, got {self.width!r}.")
        self._check_common_fields()
        super().__post_init__()

    @property
    def num_blocks(self) -> int:
        """The number of residual (droppable) blocks ``L`` (16 for ResNet-50)."""
        return sum(STAGE_SIZES[self.depth][0])

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``."""
        x = check_input(x, model="ResNet", input_channels=self.input_channels, min_size=32)
        stage_sizes, bottleneck = STAGE_SIZES[self.depth]
        rates = self.block_rates(self.num_blocks)
        key = model_key(self, train and max(rates) > 0)
        x = Conv(
            self.width,
            (7, 7),
            2,
            padding=((3, 3), (3, 3)),
            dtype=self.dtype,
            impl=self.conv_impl,
            name="stem_conv",
        )(x)
        x = batch_norm(
            train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        common = dict(
            bottleneck=bottleneck,
            train=train,
            drop_mode=self.drop_mode,
            scale_by_keep=self.scale_by_keep,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
        )
        first_index = 0
        for stage, num in enumerate(stage_sizes):
            features = self.width * 2**stage
            x = apply_stage(
                ResNetBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=dict(features=features, strides=1 if stage == 0 else 2, **common),
                rest_kwargs=dict(features=features, strides=1, **common),
                rates=rates[first_index : first_index + num],
                first_index=first_index,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
            )
            first_index += num
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
