"""Alternative formulations of a k x k convolution and its gradients, for the micro-benchmark.

`sdjax.conv.conv2d` computes a general k x k convolution (``feature_group_count == 1``) with
one fixed formulation: forward `lax.conv_general_dilated`, kernel gradient and input gradient as
canonical forward convolutions. This module keeps the other formulations that
``python -m experiments.convolutions.conv_microbench --explore`` times against it. They are not
part of the package and use only its public `sdjax.conv.conv2d` (for the package's own
gradients); each has the values and gradients of `lax.conv_general_dilated`.

A formulation is a triple ``(forward, dkernel, dx)``:

* forward: ``"lax"`` (`lax.conv_general_dilated`), ``"im2col"`` (patches @ W, one GEMM),
  ``"taps"`` (sum over kernel taps of ``x_tap @ W[i, j]``).
* dkernel: ``"conv"`` (the package's: a convolution of ``x`` with ``g`` as the window),
  ``"taps"`` (one GEMM per tap), ``"im2col"`` (patches^T @ g, one GEMM).
* dx: ``"conv"`` (the package's: the stride-dilated ``g`` convolved with the flipped kernel),
  ``"taps"`` (``g @ W[i, j]^T`` per tap, then shifted adds), ``"cols"`` (one GEMM for all
  taps, then shifted adds).

No randomness.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from sdjax import conv

FORWARD = ("lax", "im2col", "taps")
DKERNEL = ("conv", "taps", "im2col")
DX = ("conv", "taps", "cols")
PACKAGE = ("lax", "conv", "conv")
"""The formulation `sdjax.conv.conv2d` uses on its fast path."""


def formulations(pass_: str) -> list[tuple[str, str, str]]:
    """The formulations the micro-benchmark times for a pass.

    Args:
      pass_: ``"fwd"`` (every forward formulation; the gradients are not run) or ``"fwd+bwd"``
        (the package's forward with every dkernel x dx pair).

    Returns:
      ``(forward, dkernel, dx)`` triples, the package's first.

    Raises:
      ValueError: an unknown ``pass_``.
    """
    if pass_ == "fwd":
        return [PACKAGE] + [(f, *PACKAGE[1:]) for f in FORWARD if f != PACKAGE[0]]
    if pass_ == "fwd+bwd":
        pairs = [(dk, dx) for dk, dx in itertools.product(DKERNEL, DX) if (dk, dx) != PACKAGE[1:]]
        return [PACKAGE] + [(PACKAGE[0], dk, dx) for dk, dx in pairs]
    raise ValueError(f"pass_={pass_!r} is not valid; allowed values: 'fwd', 'fwd+bwd'")


def conv2d(x, kernel, *, strides=1, padding="SAME", formulation=PACKAGE):
    """A k x k convolution (NHWC x HWIO, one group) computed with ``formulation``.

    Args:
      x: ``(N, H, W, C_in)`` float array.
      kernel: ``(KH, KW, C_in, C_out)`` float array of ``x``'s dtype.
      strides: an int or a pair of ints.
      padding: ``"SAME"``, ``"VALID"`` or explicit pairs, as `sdjax.conv.conv2d`.
      formulation: ``(forward, dkernel, dx)``, see the module docstring.

    Returns:
      ``(N, H_out, W_out, C_out)`` in ``x``'s dtype; gradients through a `jax.custom_vjp`.

    Raises:
      ValueError: an unknown formulation name (before tracing the convolution).
    """
    for kind, allowed in zip(formulation, (FORWARD, DKERNEL, DX), strict=True):
        if kind not in allowed:
            raise ValueError(f"formulation={formulation!r}: {kind!r} not in {allowed}")
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding.upper())
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(x, kernel, strides, pads, tuple(formulation))


# Building blocks: a kernel tap's input window (strided slice), its transpose, padding, cropping.


def _pad(x, pads):
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _out_hw(xp, kernel_hw, strides):
    return tuple(
        (p - k) // s + 1 for p, k, s in zip(xp.shape[1:3], kernel_hw, strides, strict=True)
    )


def _tap(xp, i, j, out_hw, strides):
    """What kernel tap (i, j) sees: ``xp[:, i::s, j::s]`` cut to the output size."""
    (ho, wo), (sh, sw) = out_hw, strides
    return xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]


def _untap(t, i, j, padded_hw, strides):
    """The transpose of `_tap`: ``t`` scattered into zeros of the padded input's size."""
    (ho, wo), (sh, sw) = t.shape[1:3], strides
    zeros = jnp.zeros((t.shape[0], *padded_hw, t.shape[3]), t.dtype)
    return zeros.at[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :].set(t)


def _crop(xp, pads, hw):
    (lo_h, _), (lo_w, _) = pads
    return xp[:, lo_h : lo_h + hw[0], lo_w : lo_w + hw[1], :]


def _acc_dtype(dtype):
    """float32 accumulation for low-precision floats, else the dtype itself."""
    return jnp.promote_types(dtype, jnp.float32)


def _package_vjp(x, kernel, strides, pads):
    """The package's gradients (`sdjax.conv.conv2d`'s custom-VJP path) as a function of ``g``."""
    _, vjp = jax.vjp(
        lambda a, b: conv.conv2d(a, b, strides=strides, padding=pads, impl="xla_custom_vjp"),
        x,
        kernel,
    )
    return vjp


def _patches(xp, kernel_hw, out_hw, strides):
    """im2col: ``(N, H_out, W_out, KH * KW * C)``, tap-major (matching HWIO reshaped)."""
    kh, kw = kernel_hw
    taps = [_tap(xp, i, j, out_hw, strides) for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]


def _forward(x, kernel, strides, pads, kind):
    if kind == "lax":
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    kh, kw, in_channels, out_channels = kernel.shape
    acc = _acc_dtype(x.dtype)
    xp = _pad(x, pads)
    out_hw = _out_hw(xp, (kh, kw), strides)
    dims = (((3,), (0,)), ((), ()))
    if kind == "im2col":
        cols = _patches(xp, (kh, kw), out_hw, strides)
        w = kernel.reshape(kh * kw * in_channels, out_channels)
        out = lax.dot_general(cols, w, dims, preferred_element_type=acc)
    else:  # taps
        out = sum(
            lax.dot_general(
                _tap(xp, i, j, out_hw, strides), kernel[i, j], dims, preferred_element_type=acc
            )
            for i in range(kh)
            for j in range(kw)
        )
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, formulation):
    return _forward(x, kernel, strides, pads, formulation[0])


def _conv_fwd(x, kernel, strides, pads, formulation):
    return _forward(x, kernel, strides, pads, formulation[0]), (x, kernel)


def _conv_bwd(strides, pads, formulation, residuals, g):
    _, dk_kind, dx_kind = formulation
    x, kernel = residuals
    kh, kw, in_channels, out_channels = kernel.shape
    acc = _acc_dtype(x.dtype)
    xp = _pad(x, pads)
    out_hw = g.shape[1:3]
    contract_nhw = (((0, 1, 2), (0, 1, 2)), ((), ()))
    package_dx, package_dkernel = _package_vjp(x, kernel, strides, pads)(g)

    if dk_kind == "conv":
        dkernel = package_dkernel
    elif dk_kind == "taps":
        dk_taps = [
            lax.dot_general(
                _tap(xp, i, j, out_hw, strides), g, contract_nhw, preferred_element_type=acc
            )
            for i in range(kh)
            for j in range(kw)
        ]
        dkernel = jnp.stack(dk_taps).reshape(kh, kw, in_channels, out_channels)
    else:  # im2col
        cols = _patches(xp, (kh, kw), out_hw, strides)
        dkernel = lax.dot_general(cols, g, contract_nhw, preferred_element_type=acc)
        dkernel = dkernel.reshape(kh, kw, in_channels, out_channels)

    if dx_kind == "conv":
        dx = package_dx
    else:
        contract_o = (((3,), (1,)), ((), ()))
        if dx_kind == "taps":
            dtaps = [
                lax.dot_general(g, kernel[i, j], contract_o, preferred_element_type=acc)
                for i in range(kh)
                for j in range(kw)
            ]
        else:  # cols
            w = kernel.reshape(kh * kw * in_channels, out_channels)
            dcols = lax.dot_general(g, w, contract_o, preferred_element_type=acc)
            dtaps = jnp.split(dcols, kh * kw, axis=-1)
        dxp = sum(
            _untap(dtap, t // kw, t % kw, xp.shape[1:3], strides) for t, dtap in enumerate(dtaps)
        )
        dx = _crop(dxp, pads, x.shape[1:3])
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
