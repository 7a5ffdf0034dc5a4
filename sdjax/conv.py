"""2-D convolutions for sdjax's models: which implementation runs, and its arguments checked.

`conv2d` keeps the semantics of `lax.conv_general_dilated` (NHWC inputs, HWIO kernels, TF/lax
"SAME" padding) and chooses, per call and on the host, one of `IMPLS`:

* ``"onednn"``: oneDNN's convolution kernels through an XLA FFI custom call (`sdjax.onednn`;
  CPU only, where the library is available);
* ``"xla_custom_vjp"``: XLA convolutions and matrix products under a `jax.custom_vjp` whose
  gradients XLA:CPU computes fast (`sdjax.conv_xla`; called ``"fast"`` before 0.2.0);
* ``"xla"``: the stock `lax.conv_general_dilated`;
* ``"auto"``: ``"onednn"`` on CPU when available, else ``"xla_custom_vjp"`` on CPU and
  ``"xla"`` on other backends (`resolve_impl`).

Grouped convolutions other than depthwise run `lax.conv_general_dilated` whatever ``impl``
says (except with oneDNN). No randomness is involved anywhere in this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sdjax import conv_xla

__all__ = ["IMPLS", "conv2d", "resolve_impl"]

IMPLS = ("auto", "xla_custom_vjp", "xla", "onednn")
"""Valid values of `conv2d`'s ``impl`` argument."""

PaddingLike = str | Sequence[Sequence[int]]

_DIMENSION_NUMBERS = conv_xla.DIMENSION_NUMBERS
_Pads = conv_xla.Pads


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
        return conv_xla.depthwise_conv(x, kernel, strides, pads)
    if kernel.shape[:2] == (1, 1):
        return conv_xla.pointwise_conv(x, kernel, strides, pads)
    return conv_xla.general_conv(x, kernel, strides, pads)


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
