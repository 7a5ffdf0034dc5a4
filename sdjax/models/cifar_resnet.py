"""The CIFAR ResNets of the stochastic depth paper (Huang et al., 2016), depth ``6n + 2``.

Architecture (He et al., 2016, section 4.2, as in the paper's Torch code):

* stem: 3x3 conv, 16 filters, BatchNorm, ReLU;
* three stages of ``n`` basic blocks with 16, 32 and 64 filters; the first block of stages 2 and
  3 halves the resolution (stride-2 first conv). A block computes
  ``relu(shortcut(x) + drop_path(bn(conv3x3(relu(bn(conv3x3(x)))))))``;
* the shortcut is the identity, or for a downsampling block 2x2 average pooling with stride 2
  followed by zero-padding of the new channels (no parameters);
* global average pooling and a dense classifier.

Convolutions have no bias. Every one of the ``L = 3n`` blocks, downsampling ones included, can be
dropped; block ``l = 1..L`` gets the schedule's rate (by default the paper's linear decay to
``final_drop_rate = 0.5``, dropped batch-wise with eval-time scaling). ResNet-110 (``n = 18``,
``L = 54``) has 1,727,962 parameters.
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
    pad_channels_shortcut,
    relu_residual,
)

__all__ = ["CifarResNet", "CifarResNetBlock", "DEPTHS"]

#: Depths registered by name (``cifar_resnet<depth>``); any ``6n + 2`` works.
DEPTHS = (20, 32, 44, 56, 110, 152, 1202)  # 152: the paper's SVHN net


class _BasicBranch(nn.Module):
    """Conv3x3-BN-ReLU-Conv3x3-BN: the residual branch of a basic block."""

    features: int
    strides: int
    train: bool
    bn_momentum: float
    bn_epsilon: float
    dtype: Any
    conv_impl: str

    @nn.compact
    def __call__(self, x):
        def norm(name):
            return batch_norm(
                self.train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                name=name,
            )

        def conv(strides, name):
            return Conv(
                self.features, (3, 3), strides, dtype=self.dtype, impl=self.conv_impl, name=name
            )

        y = conv(self.strides, "conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = conv(1, "conv2")(y)
        return norm("bn2")(y)


class CifarResNetBlock(nn.Module):
    """A basic block with a parameter-free shortcut and stochastic depth.

    ``relu(shortcut(x) + drop_path(branch(x)))``; see :class:`sdjax.layers.DropPathResidual`.
    Called as ``block(x, rate, block_index, key)``: ``rate`` is the drop probability (a Python
    float, or a traced 0-d array inside ``nn.scan``), ``key`` the model's stochastic-depth key
    (None: deterministic) from which the block's gate key is ``fold_in(key, block_index)``.
    """

    features: int
    strides: int = 1
    train: bool = False
    drop_mode: str = "batch"
    scale_by_keep: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, rate, block_index, key):
        shortcut = pad_channels_shortcut(x, self.features, self.strides)
        branch = _BasicBranch(
            self.features,
            self.strides,
            self.train,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            self.conv_impl,
        )
        return relu_residual(self, branch, x, shortcut, rate, block_index, key)


class CifarResNet(nn.Module, StochasticDepthFields):
    """CIFAR ResNet of depth ``6n + 2`` with stochastic depth (the paper's defaults).

    Attributes:
      depth: ``6n + 2`` (20, 32, 44, 56, 110, 1202, ...).
      num_classes: number of logits (10).
      final_drop_rate: drop rate of the last block (0.5; 0 = constant depth).
      drop_schedule: ``"linear"`` (paper), ``"uniform"`` or ``"efficientnet"``.
      drop_mode: ``"batch"`` (paper: skip the block for the whole batch) or ``"row"``.
      scale_by_keep: False (paper: the branch is scaled by ``1 - rate`` at eval time).
      scan_blocks: ``nn.scan`` over the identical blocks of each stage (False).
      remat: ``nn.remat`` per block (False).
      dtype: compute dtype (float32); parameters float32, logits float32.
      conv_impl: ``"auto"`` | ``"fast"`` | ``"xla"``.
      input_channels: channels of the input images (3).
      widths: filters of the three stages ((16, 32, 64)).
      bn_momentum / bn_epsilon: BatchNorm (0.9 / 1e-5, Torch's 0.1 / 1e-5).

    Call: ``model.apply(variables, x, train=..., rngs={"dropout": key},
    mutable=["batch_stats"])`` with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 4``;
    returns float32 logits ``(N, num_classes)``. In training with ``final_drop_rate > 0`` one key
    is drawn from the ``"dropout"`` collection per call.
    """

    depth: int = 110
    num_classes: int = 10
    final_drop_rate: float = 0.5
    drop_schedule: str = "linear"
    drop_mode: str = "batch"
    scale_by_keep: bool = False
    scan_blocks: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    input_channels: int = 3
    widths: tuple[int, int, int] = (16, 32, 64)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        if (
            isinstance(self.depth, bool)
            or not isinstance(self.depth, int)
            or self.depth < 8
            or (self.depth - 2) % 6
        ):
            raise ValueError(
                f"CifarResNet: depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 44, 56, 110, 1202), "
                f"got {self.depth!r}."
            )
        widths = tuple(self.widths)
        if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"CifarResNet: widths must be 3 positive ints, got {self.widths!r}.")
        if any(b < a for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError(
                f"CifarResNet: widths must not decrease (zero-padding shortcut), got {widths}."
            )
        self._check_common_fields()
        super().__post_init__()

    @property
    def blocks_per_stage(self) -> int:
        """``n`` of depth ``6n + 2``."""
        return (self.depth - 2) // 6

    @property
    def num_blocks(self) -> int:
        """``L = 3n``: the number of residual (droppable) blocks."""
        return 3 * self.blocks_per_stage

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``."""
        x = check_input(x, model="CifarResNet", input_channels=self.input_channels, min_size=4)
        rates = self.block_rates(self.num_blocks)
        key = model_key(self, train and max(rates) > 0)
        x = Conv(self.widths[0], (3, 3), dtype=self.dtype, impl=self.conv_impl, name="stem_conv")(x)
        x = batch_norm(
            train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        common = dict(
            train=train,
            drop_mode=self.drop_mode,
            scale_by_keep=self.scale_by_keep,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
        )
        n = self.blocks_per_stage
        for stage, features in enumerate(self.widths):
            strides = 1 if stage == 0 else 2
            x = apply_stage(
                CifarResNetBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=dict(features=features, strides=strides, **common),
                rest_kwargs=dict(features=features, strides=1, **common),
                rates=rates[stage * n : (stage + 1) * n],
                first_index=stage * n,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
            )
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)
