"""The CIFAR ResNets of the stochastic depth paper (Huang et al., 2016), depth ``6n + 2``.

Architecture (He et al., 2016, section 4.2, as in the paper's Torch code):

* stem: 3x3 conv, 16 filters, BatchNorm, ReLU;
* three stages of ``n`` basic blocks with 16, 32 and 64 filters; the first block of stages 2 and
  3 halves the resolution (stride-2 first conv). A block computes
  ``relu(shortcut(x) + drop_path(bn(conv3x3(relu(bn(conv3x3(x)))))))``;
* the shortcut is the identity, or for a downsampling block 2x2 average pooling with stride 2
  followed by zero-padding of the new channels (no parameters);
* global average pooling and a dense classifier.

Convolutions have no bias: the paper's Torch convolutions have one, initialised to 0, but each
is followed by BatchNorm, which subtracts the batch mean, so that bias gets a zero gradient and
stays 0 (also under weight decay); leaving it out changes nothing and keeps the parameter counts.
Initialisation and the stride-2 padding are fields: sdjax's defaults (He fan-out, flax's
``Dense``, BatchNorm scale 1, "SAME" padding 0/1) or the paper's code (``conv_init="he_fan_in"``,
``head_init="torch_linear"``, ``bn_scale_init="uniform"``, ``conv_padding="symmetric"``).
Every one of the ``L = 3n`` blocks, downsampling ones included, can be dropped; block ``l = 1..L`` gets the schedule's rate (by default the paper's linear decay to
``final_drop_rate = 0.5``, dropped batch-wise with eval-time scaling). ResNet-110 (``n = 18``,
``L = 54``) has 1,727,962 parameters.
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
    model_key,
)
from sdjax.models.blocks import ModuleDef, ResidualBlock
from sdjax.models.conv_norm import (
    conv_kernel_init,
    conv_kernel_init_fan_in,
    pad_channels_shortcut,
    torch_linear_init,
)
from sdjax.models.stages import apply_stage

__all__ = ["CifarResNet", "CifarResNetBlock", "DEPTHS", "RECIPE_CHOICES"]

#: Depths registered by name (``cifar_resnet<depth>``); any ``6n + 2`` works.
DEPTHS = (20, 32, 44, 56, 110, 152, 1202)  # 152: the paper's SVHN net

#: The allowed values of the initialisation and padding fields (sdjax's default first).
RECIPE_CHOICES = {
    "conv_padding": ("same", "symmetric"),
    "conv_init": ("he_fan_out", "he_fan_in"),
    "head_init": ("lecun_normal", "torch_linear"),
    "bn_scale_init": ("ones", "uniform"),
}


class _BasicBranch(nn.Module):
    """Conv3x3-BN-ReLU-Conv3x3-BN: the residual branch of a basic block."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (3, 3), self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), 1, name="conv2")(y)
        return self.norm(name="bn2")(y)


class CifarResNetBlock(ResidualBlock):
    """A basic block with a parameter-free shortcut and stochastic depth.

    ``relu(shortcut(x) + drop_path(branch(x)))``; called as ``block(x, rate, block_index, key)``
    (see :mod:`sdjax.models.blocks`).
    """

    @nn.compact
    def __call__(self, x, rate, block_index, key, min_rate=None):
        shortcut = pad_channels_shortcut(x, self.features, self.strides)
        branch = functools.partial(_BasicBranch, self.features, self.strides, self.conv, self.norm)
        return nn.relu(self.residual(branch, x, shortcut, rate, block_index, key, min_rate))


class CifarResNet(StochasticDepthModel):
    """CIFAR ResNet of depth ``6n + 2`` with stochastic depth (the paper's defaults).

    Attributes:
      depth: ``6n + 2`` (20, 32, 44, 56, 110, 1202, ...; 110).
      widths: filters of the three stages ((16, 32, 64)).
      conv_padding: ``"same"`` (XLA's SAME: a stride-2 3x3 conv pads 0 before and 1 after) or
        ``"symmetric"`` (1 on each side, as ``cudnn.SpatialConvolution(..., 1,1)`` in the
        paper's code); stride-1 convolutions pad 1/1 either way.
      conv_init: ``"he_fan_out"`` (normal, std ``sqrt(2 / fan_out)``) or ``"he_fan_in"``
        (normal, std ``sqrt(2 / fan_in)``: the paper's ``nninit.kaiming``, gain relu).
      head_init: the classifier's init, ``"lecun_normal"`` (flax's ``Dense``: truncated normal
        kernel, zero bias) or ``"torch_linear"`` (Torch's ``nn.Linear``: kernel and bias
        uniform in ``+-1 / sqrt(fan_in)``).
      bn_scale_init: BatchNorm's scale, ``"ones"`` or ``"uniform"`` in ``[0, 1)`` (the reset of
        ``cudnn.SpatialBatchNormalization`` the paper's code keeps; its bias starts at 0 in
        both).
      The shared fields (keyword-only) with their defaults -- 10 classes, the paper's linear
      decay to ``final_drop_rate=0.5``, ``drop_mode="batch"``, eval-time scaling, scanned
      blocks, BatchNorm 0.9 / 1e-5 (Torch's 0.1 / 1e-5) -- are those of
      :class:`sdjax.models.base.StochasticDepthModel`.

    Call: ``model.apply(variables, x, train=..., drop_rate_scale=None, rngs={"dropout": key},
    mutable=["batch_stats"])`` with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 4``;
    returns float32 logits ``(N, num_classes)``. In training with ``final_drop_rate > 0`` one key
    is drawn from the ``"dropout"`` collection per call.
    """

    depth: int = 110
    widths: tuple[int, int, int] = (16, 32, 64)
    conv_padding: str = "same"
    conv_init: str = "he_fan_out"
    head_init: str = "lecun_normal"
    bn_scale_init: str = "ones"

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
        for field, allowed in RECIPE_CHOICES.items():
            value = getattr(self, field)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(
                    f"CifarResNet: {field}={value!r} is not valid; allowed values: "
                    f"{', '.join(allowed)}."
                )
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
    def __call__(self, x, train: bool = False, drop_rate_scale: Any = None):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``.

        ``drop_rate_scale``: None, or a float32 scalar (may be traced) multiplying every block's
        drop rate (e.g. a warm-up from 0 to 1); see :func:`sdjax.models.base.scale_rate`.
        """
        x = check_input(x, model="CifarResNet", input_channels=self.input_channels, min_size=4)
        scale = check_drop_rate_scale(drop_rate_scale, "CifarResNet")
        rates = self.block_rates(self.num_blocks)
        key = model_key(self, train and max(rates) > 0)
        defs = self.recipe_defs(train)
        x = defs["conv"](self.widths[0], (3, 3), name="stem_conv")(x)
        x = nn.relu(defs["norm"](name="stem_bn")(x))
        n = self.blocks_per_stage
        for stage, features in enumerate(self.widths):
            x = apply_stage(
                CifarResNetBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=dict(features=features, strides=1 if stage == 0 else 2, **defs),
                rest_kwargs=dict(features=features, **defs),
                rates=rates[stage * n : (stage + 1) * n],
                first_index=stage * n,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
                drop_rate_scale=scale,
            )
        x = jnp.mean(x, axis=(1, 2))
        head_init = {}
        if self.head_init == "torch_linear":
            init = torch_linear_init(x.shape[-1])
            head_init = dict(kernel_init=init, bias_init=init)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **head_init)(x)
        return x.astype(jnp.float32)

    def recipe_defs(self, train: bool) -> dict[str, Any]:
        """:meth:`block_defs` with this model's padding and initialisation fields applied."""
        defs = self.block_defs(train)
        conv_kwargs = {
            "kernel_init": conv_kernel_init_fan_in
            if self.conv_init == "he_fan_in"
            else conv_kernel_init
        }
        if self.conv_padding == "symmetric":  # every conv here is 3x3
            conv_kwargs["padding"] = ((1, 1), (1, 1))
        defs["conv"] = functools.partial(defs["conv"], **conv_kwargs)
        if self.bn_scale_init == "uniform":
            defs["norm"] = functools.partial(
                defs["norm"], scale_init=nn.initializers.uniform(scale=1.0)
            )
        return defs
