"""Convolution and the parameter-free shortcut the sdjax models are built from.

* :class:`Conv` -- a 2-D convolution over :func:`sdjax.conv.conv2d`, parameters in
  ``param_dtype`` (float32) and compute in ``dtype`` (e.g. bfloat16). Models hand it to their
  blocks as a factory (``functools.partial(Conv, dtype=..., impl=...)``), with
  ``functools.partial(nn.BatchNorm, ...)`` as the normalization factory.
* :func:`pad_channels_shortcut` -- the parameter-free shortcut of the paper's CIFAR ResNets.
* Initializers: :data:`conv_kernel_init` (sdjax's He fan-out), :data:`conv_kernel_init_fan_in`
  (the paper's ``nninit.kaiming`` with ``gain = 'relu'``) and :func:`torch_linear_init` (Torch's
  default ``nn.Linear`` / ``nn.SpatialConvolution`` reset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.conv import conv2d

__all__ = [
    "Conv",
    "conv_kernel_init",
    "conv_kernel_init_fan_in",
    "pad_channels_shortcut",
    "torch_linear_init",
]

Array = jax.Array
Dtype = Any

#: He/Kaiming normal with fan-out (std ``sqrt(2 / (KH * KW * C_out))``), as the reference
#: EfficientNet and torchvision's ResNets; sdjax's default.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: He/Kaiming normal with fan-in (std ``sqrt(2 / (KH * KW * C_in))``, untruncated): the paper's
#: ``nninit.kaiming`` with ``gain = 'relu'`` (``gain * sqrt(1 / fanIn)``, normal by default).
conv_kernel_init_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_linear_init(fan_in: int) -> Callable:
    """Torch's default reset of ``nn.Linear``: uniform in ``+-1 / sqrt(fan_in)``.

    Torch draws the weight and the bias from this same distribution; pass the result as both
    ``kernel_init`` and ``bias_init`` (``fan_in``: the layer's input features).
    """
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """2-D convolution (NHWC input, HWIO kernel) computed by :func:`sdjax.conv.conv2d`.

    Attributes:
      features: number of output channels.
      kernel_size: ``(KH, KW)``.
      strides: ``(SH, SW)`` or one int.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo_h, hi_h), (lo_w, hi_w))``.
      feature_group_count: channel groups; the number of input channels for a depthwise conv.
      use_bias: add a learned bias (off by default: every conv here is followed by BatchNorm).
      dtype: compute dtype; the input and the kernel are cast to it.
      param_dtype: dtype of the stored parameters (float32).
      kernel_init / bias_init: initializers.
      impl: ``conv2d``'s implementation switch, ``"auto"`` | ``"xla_custom_vjp"`` | ``"xla"`` | ``"onednn"``.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = (1, 1)
    padding: Any = "SAME"
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init
    bias_init: Callable = nn.initializers.zeros
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x: ``(N, H, W, C_in)``. Returns: ``(N, H_out, W_out, features)`` in ``dtype``."""
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"Conv: {in_features} input channels are not divisible by "
                f"feature_group_count={self.feature_group_count}."
            )
        kernel_shape = (
            *self.kernel_size,
            in_features // self.feature_group_count,
            self.features,
        )
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        y = conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            strides=self.strides,
            padding=self.padding,
            feature_group_count=self.feature_group_count,
            impl=self.impl,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def pad_channels_shortcut(x: Array, features: int, strides: int) -> Array:
    """The parameter-free shortcut of the paper's CIFAR ResNets ("option A" with pooling).

    Args:
      x: ``(N, H, W, C)``.
      features: output channels ``C_out >= C``; channels ``C..C_out-1`` are zeros.
      strides: 1 (no pooling) or 2 (2x2 average pooling with stride 2; "SAME" padding for odd
        sizes, padded cells are not counted, so the size matches a stride-2 "SAME" conv).

    Returns:
      ``(N, ceil(H / strides), ceil(W / strides), features)``, same dtype as ``x``.
    """
    if strides != 1:
        x = nn.avg_pool(
            x,
            (strides, strides),
            strides=(strides, strides),
            padding="SAME",
            count_include_pad=False,
        )
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(f"pad_channels_shortcut: cannot shrink {x.shape[-1]} to {features}.")
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x
