"""The XLA formulations behind ``conv2d(..., impl="xla_custom_vjp")`` (`sdjax.conv`).

XLA:CPU runs the weight gradient of a convolution (the "backward filter" conv that `jax.grad`
of `lax.conv_general_dilated` produces) many times slower than the forward pass, and
convolutions inside `lax.cond` / `lax.scan` bodies slower still (jax issue 12868). These
formulations compute the same convolutions with operations XLA:CPU handles well:

* a general k x k convolution (`general_conv`) is a `jax.custom_vjp` whose backward pass
  computes the kernel gradient as a forward convolution of ``x`` with ``g`` as the window (batch
  and feature axes swapped by explicit transposes) and the input gradient as a convolution of
  the stride-dilated ``g`` with the flipped kernel;
* a 1 x 1 convolution (`pointwise_conv`) is a matrix product (`lax.dot_general`);
* a depthwise convolution (`depthwise_conv`, ``feature_group_count == in_channels``) is a sum
  of shifted elementwise multiply-adds, also under a `jax.custom_vjp`.

Arguments arrive checked and normalised by `sdjax.conv.conv2d`: NHWC ``x``, HWIO ``kernel`` of
the same dtype, ``strides`` a pair of ints, ``pads`` explicit ``((top, bottom), (left,
right))``. Limitations: forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) is not
supported (`custom_vjp`); reverse-over-reverse works but is not tuned or required.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["DIMENSION_NUMBERS", "Pads", "depthwise_conv", "general_conv", "pointwise_conv"]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


# ----------------------------------------------------------------------------------------------
# Helpers shared by the formulations.


def _out_size(padded: int, k: int, s: int) -> int:
    return (padded - k) // s + 1


def _pad(x: jax.Array, pads: Pads) -> jax.Array:
    if pads == ((0, 0), (0, 0)):
        return x
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _tap(xp: jax.Array, i: int, j: int, out_hw, strides) -> jax.Array:
    """The input window that kernel tap (i, j) sees: ``xp[:, i::s, j::s][:, :H_out, :W_out]``."""
    (ho, wo), (sh, sw) = out_hw, strides
    n, _, _, c = xp.shape
    return lax.slice(
        xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
    )


def _untap(t: jax.Array, i: int, j: int, padded_hw, strides) -> jax.Array:
    """Transpose of `_tap`: places ``t`` at rows ``i + s*r``, columns ``j + s*q`` of zeros."""
    (hp, wp), (sh, sw) = padded_hw, strides
    _, ho, wo, _ = t.shape
    zero = jnp.zeros((), t.dtype)
    return lax.pad(
        t,
        zero,
        (
            (0, 0, 0),
            (i, hp - i - (ho - 1) * sh - 1, sh - 1),
            (j, wp - j - (wo - 1) * sw - 1, sw - 1),
            (0, 0, 0),
        ),
    )


def _acc_dtype(dtype) -> jnp.dtype:
    """float32 accumulation for low-precision floats, else the dtype itself."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def _crop(xp: jax.Array, pads: Pads, hw) -> jax.Array:
    (lo_h, _), (lo_w, _) = pads
    h, w = hw
    return xp[:, lo_h : lo_h + h, lo_w : lo_w + w, :]


# ----------------------------------------------------------------------------------------------
# 1 x 1 convolution: a matrix product (autodiff of a dot is already GEMMs).


def pointwise_conv(x, kernel, strides, pads):
    xp = _pad(x, pads)
    out_hw = tuple(_out_size(p, 1, s) for p, s in zip(xp.shape[1:3], strides, strict=True))
    xs = _tap(xp, 0, 0, out_hw, strides)
    out = lax.dot_general(
        xs,
        kernel[0, 0],
        (((3,), (0,)), ((), ())),
        preferred_element_type=_acc_dtype(x.dtype),
    )
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Depthwise convolution: shifted elementwise multiply-adds.


def _depthwise_forward(x, kernel, strides, pads):
    kh, kw, _, out_channels = kernel.shape
    multiplier = out_channels // x.shape[-1]
    acc = _acc_dtype(x.dtype)
    xp = _pad(x, pads)
    if multiplier > 1:
        # lax's grouping: output channel c * multiplier + m reads input channel c.
        xp = jnp.repeat(xp, multiplier, axis=-1)
    out_hw = tuple(
        _out_size(p, k, s) for p, k, s in zip(xp.shape[1:3], (kh, kw), strides, strict=True)
    )
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, out_hw, strides).astype(acc) * kernel[i, j, 0].astype(acc)
            out = term if out is None else out + term
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, kernel, strides, pads):
    return _depthwise_forward(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
    return _depthwise_forward(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    kh, kw, _, out_channels = kernel.shape
    in_channels = x.shape[-1]
    multiplier = out_channels // in_channels
    acc = _acc_dtype(x.dtype)
    xp = _pad(x, pads)
    if multiplier > 1:
        xp = jnp.repeat(xp, multiplier, axis=-1)
    out_hw = g.shape[1:3]
    g = g.astype(acc)
    dk_taps = []
    dxp = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, out_hw, strides).astype(acc)
            dk_taps.append(jnp.sum(tap * g, axis=(0, 1, 2)))
            term = _untap(g * kernel[i, j, 0].astype(acc), i, j, xp.shape[1:3], strides)
            dxp = term if dxp is None else dxp + term
    dkernel = jnp.stack(dk_taps).reshape(kh, kw, 1, out_channels)
    if multiplier > 1:
        n, hp, wp, _ = dxp.shape
        dxp = dxp.reshape(n, hp, wp, in_channels, multiplier).sum(axis=-1)
    dx = _crop(dxp, pads, x.shape[1:3])
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# ----------------------------------------------------------------------------------------------
# General k x k convolution (feature_group_count == 1): the forward pass is
# `lax.conv_general_dilated`; the backward pass computes both gradients as canonical forward
# convolutions (NHWC/HWIO), which XLA:CPU runs fast at top level and inside cond/scan bodies.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def general_conv(x, kernel, strides, pads):
    return _conv_forward(x, kernel, strides, pads)


def _conv_forward(x, kernel, strides, pads):
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads, dimension_numbers=DIMENSION_NUMBERS
    )


def _general_fwd(x, kernel, strides, pads):
    return _conv_forward(x, kernel, strides, pads), (x, kernel)


def _general_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    dkernel = _conv_transpose_rhs(x, g, kernel.shape[:2], strides, pads)
    dx = _conv_transpose_lhs(g, kernel, x.shape, strides, pads)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


def _conv_transpose_rhs(x, g, kernel_hw, strides, pads):
    """dkernel as a canonical convolution: batch <-> feature swapped by explicit transposes.

    The spatial padding is left to the convolution (``padding=``) rather than applied to ``x``
    first, the form XLA:CPU runs faster.
    """
    out_hw = g.shape[1:3]
    conv_pads = []
    for axis, (size, k, s, (lo, _), o) in enumerate(
        zip(x.shape[1:3], kernel_hw, strides, pads, out_hw, strict=True)
    ):
        # Only the rows/columns that some tap reads: [-lo, k + (o - 1) * s - lo).
        hi = k + (o - 1) * s - lo - size
        if hi < 0:
            x = lax.slice_in_dim(x, 0, size + hi, axis=axis + 1)
            hi = 0
        conv_pads.append((lo, hi))
    lhs = jnp.transpose(x, (3, 1, 2, 0))  # (C, H, W, N): C is the batch, N the feature
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # (H_out, W_out, N, O): g is the window
    out = lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=(1, 1),
        padding=conv_pads,
        rhs_dilation=strides,
        dimension_numbers=DIMENSION_NUMBERS,
        preferred_element_type=_acc_dtype(x.dtype),
    )  # (C, KH, KW, O)
    return jnp.transpose(out, (1, 2, 0, 3))


def _conv_transpose_lhs(g, kernel, x_shape, strides, pads):
    """dx as a stride-1 convolution of the stride-dilated ``g`` with the flipped kernel."""
    kh, kw = kernel.shape[:2]
    out_hw = g.shape[1:3]
    trans_pads = []
    for size, k, s, (lo, _), o in zip(x_shape[1:3], (kh, kw), strides, pads, out_hw, strict=True):
        trans_pads.append((k - 1 - lo, size - 1 - (o - 1) * s + lo))
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return lax.conv_general_dilated(
        g,
        flipped,
        window_strides=(1, 1),
        padding=trans_pads,
        lhs_dilation=strides,
        dimension_numbers=DIMENSION_NUMBERS,
        preferred_element_type=None,
    )


general_conv.defvjp(_general_fwd, _general_bwd)
