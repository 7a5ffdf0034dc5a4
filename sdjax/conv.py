"""2-D convolutions whose gradients XLA:CPU computes fast.

XLA:CPU runs the weight gradient of a convolution (the "backward filter" conv that
`jax.grad` of `lax.conv_general_dilated` produces) many times slower than the
forward pass, and convolutions inside `lax.cond` / `lax.scan` bodies slower still
(jax issue 12868). `conv2d` keeps the semantics of `lax.conv_general_dilated`
(NHWC inputs, HWIO kernels, TF/lax "SAME" padding) but, on the CPU backend,
computes the convolution with formulations XLA:CPU handles well:

* a general k x k convolution is a `jax.custom_vjp` whose backward pass computes
  the kernel gradient as a forward convolution of ``x`` with ``g`` as the window
  (batch and feature axes swapped by explicit transposes) and the input gradient
  as a convolution of the stride-dilated ``g`` with the flipped kernel;
* a 1 x 1 convolution is a matrix product (`lax.dot_general`);
* a depthwise convolution (``feature_group_count == in_channels``) is a sum of
  shifted elementwise multiply-adds.

Other backends (GPU/TPU) keep the stock `lax.conv_general_dilated` with
``impl="auto"``. No randomness is involved anywhere in this module.

Limitations: forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) of the custom-VJP
path is not supported (it is a `custom_vjp`); reverse-over-reverse works but is
not tuned or required. Grouped convolutions other than depthwise fall back to
`lax.conv_general_dilated` even with ``impl="xla_custom_vjp"``.

``impl="xla_custom_vjp"`` names these formulations: XLA convolutions and matrix products under a
`jax.custom_vjp` (called ``"fast"`` before 0.2.0; ``"onednn"`` is faster where it is available).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["IMPLS", "conv2d", "resolve_impl"]

IMPLS = ("auto", "xla_custom_vjp", "xla", "onednn")
"""Valid values of `conv2d`'s ``impl`` argument."""

PaddingLike = str | Sequence[Sequence[int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_Pads = tuple[tuple[int, int], tuple[int, int]]


def resolve_impl(impl: str) -> str:
    """Returns the implementation ``impl`` stands for on the current default backend.

    Args:
      impl: one of `IMPLS`.

    Returns:
      ``"onednn"``, ``"xla_custom_vjp"`` or ``"xla"``. ``"auto"`` is ``"onednn"`` when
      `jax.default_backend()` is ``"cpu"`` and the oneDNN route is available
      (`sdjax.onednn.available`; ``SDJAX_ONEDNN=0`` in the environment turns this
      off), else ``"xla_custom_vjp"`` on CPU and ``"xla"`` on other backends. Decided on the host
      (at trace time); the first call may build the oneDNN handlers (seconds, once).

    Raises:
      ValueError: ``impl`` is not one of `IMPLS`.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"conv2d: impl={impl!r} is not valid; allowed values: {', '.join(IMPLS)}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "onednn" if _auto_onednn() else "xla_custom_vjp"
    return impl


def _auto_onednn() -> bool:
    """Whether ``impl="auto"`` may use oneDNN in this process (imports it lazily)."""
    if os.environ.get("SDJAX_ONEDNN", "1").lower() in ("0", "false", "no", "off"):
        return False
    from sdjax import onednn

    return onednn.available()


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = (1, 1),
    padding: PaddingLike = "SAME",
    feature_group_count: int = 1,
    impl: str = "auto",
) -> jax.Array:
    """2-D convolution with the semantics of `lax.conv_general_dilated`, fast on CPU.

    Args:
      x: input, shape ``(N, H, W, C_in)`` (NHWC), float dtype.
      kernel: filter, shape ``(KH, KW, C_in // feature_group_count, C_out)`` (HWIO).
        If ``x`` and ``kernel`` have different dtypes, both are promoted to their
        common dtype first (`jnp.result_type`).
      strides: one int (both dims) or a pair ``(stride_h, stride_w)`` of positive ints.
      padding: ``"SAME"`` (TF/lax semantics: output size ``ceil(in / stride)``, the
        extra padding row/column, if any, goes at the high end), ``"VALID"`` (no
        padding), or explicit non-negative ``((lo_h, hi_h), (lo_w, hi_w))``.
      feature_group_count: number of channel groups, dividing ``C_in`` and ``C_out``.
        ``1`` is a regular convolution, ``C_in`` a depthwise one (any channel
        multiplier ``C_out // C_in``). Other values use `lax.conv_general_dilated`.
      impl: ``"auto"`` (on CPU: oneDNN when available, else the custom-VJP path; the stock
        XLA convolution on other backends, see `resolve_impl`), ``"xla_custom_vjp"`` (always the
        custom-VJP path), ``"xla"`` (always `lax.conv_general_dilated`) or ``"onednn"``
        (oneDNN kernels through XLA FFI custom calls, `sdjax.onednn`; float32 and
        bfloat16, any grouping). The oneDNN route runs only where the program runs on
        CPU: it sits in a `lax.platform_dependent` whose other branch is the stock XLA
        convolution, so programs lowered for GPU/TPU contain no custom call; nor does a
        program exported with `jax.export`, for any platforms (CPU included).

    Returns:
      ``(N, H_out, W_out, C_out)`` array in the (promoted) input dtype. Values and
      gradients (with respect to ``x`` and ``kernel``) equal those of
      `lax.conv_general_dilated` up to floating-point rounding; bfloat16 inputs
      are accumulated in float32 by the custom-VJP path.

    Raises:
      ValueError: on a bad ``impl``, ``strides``, ``padding`` or
        ``feature_group_count``, on mismatched channel counts or ranks, when
        the output would be empty, or ``impl="onednn"`` with a dtype other than
        float32/bfloat16. Raised on the host, before compiling.
      RuntimeError: ``impl="onednn"`` but the oneDNN route is unavailable (the message
        names the install line).

    Notes:
      Works under `jax.jit`, `jax.vmap`, `jax.grad`, `lax.cond`, `lax.scan` and
      `flax.linen.scan`. The custom-VJP path is a `jax.custom_vjp` (1 x 1 convolutions
      are plain matrix products instead), so forward-mode autodiff
      (`jax.jvp`, `jax.jacfwd`) of it raises; use ``impl="xla"`` for that.
    """
    resolved = resolve_impl(impl)
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    if x.ndim != 4:
        raise ValueError(f"conv2d: x must be NHWC (rank 4); got x.shape={x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"conv2d: kernel must be HWIO (rank 4); got kernel.shape={kernel.shape}")
    strides = _normalize_strides(strides)
    groups = _check_groups(feature_group_count, x.shape, kernel.shape)
    pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    dtype = jnp.result_type(x, kernel)
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)

    if resolved == "onednn":
        if _onednn_takes(impl, dtype, x.shape, kernel.shape, strides, pads, groups):
            return _onednn_conv(x, kernel, strides, pads, groups)
        resolved = "xla_custom_vjp"
    in_channels = x.shape[-1]
    depthwise = groups == in_channels and kernel.shape[2] == 1 and groups > 1
    if resolved == "xla" or (groups != 1 and not depthwise):
        return _xla_conv(x, kernel, strides, pads, groups)
    if depthwise:
        return _depthwise_conv(x, kernel, strides, pads)
    if kernel.shape[:2] == (1, 1):
        return _pointwise_conv(x, kernel, strides, pads)
    return _conv_custom_vjp(x, kernel, strides, pads)


def _xla_conv(x, kernel, strides, pads, groups):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _onednn_takes(impl: str, dtype, x_shape, kernel_shape, strides, pads, groups) -> bool:
    """Whether the oneDNN route runs this case; an explicit ``impl="onednn"`` must get it.

    ``"auto"`` skips cases oneDNN would run with reference kernels (`onednn.has_fast_kernels`).
    """
    from sdjax import onednn

    if jnp.dtype(dtype) in onednn.DTYPES:
        if impl == "onednn":
            if not onednn.available():
                raise RuntimeError(
                    f"conv2d: impl='onednn' is unavailable: {onednn.unavailable_reason()}"
                )
            case = (tuple(x_shape), tuple(kernel_shape), strides, pads, groups)
            missing = onednn.missing_implementation(*case, jnp.dtype(dtype).name)
            if missing is not None:
                raise ValueError(
                    f"conv2d: impl='onednn' cannot run dtype={jnp.dtype(dtype)} on this CPU "
                    f"({missing}); use impl='auto' to fall back to the XLA formulations"
                )
            return True
        return onednn.has_fast_kernels(
            tuple(x_shape), tuple(kernel_shape), strides, pads, groups, jnp.dtype(dtype).name
        )
    if impl == "onednn":
        raise ValueError(
            f"conv2d: impl='onednn' does not take dtype={jnp.dtype(dtype)}; allowed dtypes: "
            "float32, bfloat16 (use impl='auto' to fall back to the XLA formulations)"
        )
    return False


def _onednn_conv(x, kernel, strides, pads, groups):
    """oneDNN on CPU, the stock XLA convolution on any other platform (chosen at lowering)."""
    from sdjax import onednn

    return lax.platform_dependent(
        x,
        kernel,
        cpu=lambda a, b: onednn.conv2d(a, b, strides, pads, groups),
        default=lambda a, b: _xla_conv(a, b, strides, pads, groups),
    )


# ----------------------------------------------------------------------------------------------
# Argument checking.


def _normalize_strides(strides: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(strides, int) and not isinstance(strides, bool):
        strides = (strides, strides)
    try:
        values = tuple(strides)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in values)
    ):
        raise ValueError(
            f"conv2d: strides={strides!r} is not valid; allowed values: a positive int or a pair "
            "of positive ints (stride_h, stride_w)"
        )
    return values  # type: ignore[return-value]


def _check_groups(groups: int, x_shape, kernel_shape) -> int:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(
            f"conv2d: feature_group_count={groups!r} is not valid; allowed values: a positive int "
            "dividing the input and output channel counts"
        )
    in_channels, kernel_in, out_channels = x_shape[-1], kernel_shape[2], kernel_shape[3]
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"conv2d: feature_group_count={groups} does not divide in_channels={in_channels} "
            f"and out_channels={out_channels}; allowed values: common divisors of both"
        )
    if kernel_in * groups != in_channels:
        raise ValueError(
            f"conv2d: kernel in-channels (kernel.shape[2]={kernel_in}) times "
            f"feature_group_count={groups} must equal x's channels ({in_channels}); allowed "
            f"kernel.shape[2]: {in_channels // groups}"
        )
    return groups


def _explicit_padding(padding: PaddingLike, in_hw, kernel_hw, strides) -> _Pads:
    """Returns ``((lo_h, hi_h), (lo_w, hi_w))`` with lax's SAME/VALID semantics."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            pads = ((0, 0), (0, 0))
        elif mode == "SAME":
            pads = []
            for size, k, s in zip(in_hw, kernel_hw, strides, strict=True):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            pads = tuple(pads)
        else:
            raise ValueError(
                f"conv2d: padding={padding!r} is not valid; allowed values: 'SAME', 'VALID' or "
                "((lo_h, hi_h), (lo_w, hi_w)) of non-negative ints"
            )
    else:
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
            ok = len(pads) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for pair in padding
                for v in pair
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"conv2d: padding={padding!r} is not valid; allowed values: 'SAME', 'VALID' or "
                "((lo_h, hi_h), (lo_w, hi_w)) of non-negative ints"
            )
    for size, k, (lo, hi) in zip(in_hw, kernel_hw, pads, strict=True):
        if size + lo + hi < k:
            raise ValueError(
                f"conv2d: padded input size {size + lo + hi} (size {size}, padding {(lo, hi)}) is "
                f"smaller than the kernel size {k}; the output would be empty"
            )
    return pads  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Helpers shared by the custom-VJP path.


def _out_size(padded: int, k: int, s: int) -> int:
    return (padded - k) // s + 1


def _pad(x: jax.Array, pads: _Pads) -> jax.Array:
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


def _crop(xp: jax.Array, pads: _Pads, hw) -> jax.Array:
    (lo_h, _), (lo_w, _) = pads
    h, w = hw
    return xp[:, lo_h : lo_h + h, lo_w : lo_w + w, :]


# ----------------------------------------------------------------------------------------------
# 1 x 1 convolution: a matrix product (autodiff of a dot is already GEMMs).


def _pointwise_conv(x, kernel, strides, pads):
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
def _depthwise_conv(x, kernel, strides, pads):
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


_depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# ----------------------------------------------------------------------------------------------
# General k x k convolution (feature_group_count == 1): the forward pass is
# `lax.conv_general_dilated`; the backward pass computes both gradients as canonical forward
# convolutions (NHWC/HWIO), which XLA:CPU runs fast at top level and inside cond/scan bodies.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_custom_vjp(x, kernel, strides, pads):
    return _conv_forward(x, kernel, strides, pads)


def _conv_forward(x, kernel, strides, pads):
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads, dimension_numbers=_DIMENSION_NUMBERS
    )


def _conv_custom_vjp_fwd(x, kernel, strides, pads):
    return _conv_forward(x, kernel, strides, pads), (x, kernel)


def _conv_custom_vjp_bwd(strides, pads, residuals, g):
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
        dimension_numbers=_DIMENSION_NUMBERS,
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
        dimension_numbers=_DIMENSION_NUMBERS,
        preferred_element_type=None,
    )


_conv_custom_vjp.defvjp(_conv_custom_vjp_fwd, _conv_custom_vjp_bwd)
