"""oneDNN 2-D convolution for JAX on CPU: forward, input and kernel gradients via XLA FFI.

`conv2d` computes the same function as `lax.conv_general_dilated` with NHWC inputs, HWIO
kernels, window strides, explicit (possibly asymmetric) padding and ``feature_group_count``,
by calling oneDNN kernels through three XLA FFI custom calls, one per pass (forward, input
gradient, kernel gradient). Each pass is bilinear and its transpose is another pass, so one
`jax.custom_vjp` over the passes gives gradients of any order (reverse mode) on oneDNN.
Each call is wrapped in `jax.experimental.custom_partitioning`: under `jax.jit` with the batch
dimension sharded over several CPU devices, every device convolves its own shard (the kernel
gradient is summed over the batch axes in float32 with one all-reduce, then rounded), so
activations are never gathered. No randomness is involved.

The custom calls exist only for the CPU platform and only in programs that run here: a pass
lowers to the stock XLA convolution on any other platform and in programs lowered for
`jax.export` (for any platforms, CPU included), since custom calls have no compatibility
guarantee. `sdjax.conv.conv2d` reaches this module through `lax.platform_dependent`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.onednn import library as _library

__all__ = ["DTYPES", "available", "conv2d", "has_fast_kernels", "impl_info", "unavailable_reason"]

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
"""Element types the handlers accept (all operands share one)."""

_FWD, _BWD_DATA, _BWD_WEIGHTS = 0, 1, 2
_DN = ("NHWC", "HWIO", "NHWC")
_Pads = tuple[tuple[int, int], tuple[int, int]]
_STATUS: dict[str, str | None] = {}
_LOG = logging.getLogger("sdjax.onednn")


def unavailable_reason() -> str | None:
    """Why the oneDNN route cannot be used here, or None when it can.

    The first call builds (if needed) and loads the handlers, which may take several seconds;
    the answer is cached for the process. When the route is unavailable, the first call logs
    one warning line (logger ``sdjax.onednn``) with the reason and how to fix it.
    """
    if "reason" not in _STATUS:
        try:
            _library.load()
            _STATUS["reason"] = None
        except RuntimeError as err:
            _STATUS["reason"] = str(err)
            first_line = str(err).splitlines()[0]
            _LOG.warning("%s (convolutions use the XLA path)", first_line)
    return _STATUS["reason"]


def available() -> bool:
    """True when the oneDNN handlers are built (or buildable) and loaded; see `unavailable_reason`."""
    return unavailable_reason() is None


def _num_threads(num_devices: int) -> int:
    """OpenMP threads per call: ``SDJAX_ONEDNN_THREADS``, else the usable cores / devices.

    ``num_devices`` CPU devices may each run a call at once (data parallelism), so each gets
    an equal share of the cores and the host is not oversubscribed.
    """
    env = os.environ.get("SDJAX_ONEDNN_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, num_devices))


def _out_hw(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads, strict=True)
    )


def _attrs(strides, pads, groups, num_threads) -> dict[str, np.int64]:
    (plh, phh), (plw, phw) = pads
    values = dict(
        stride_h=strides[0],
        stride_w=strides[1],
        pad_lo_h=plh,
        pad_hi_h=phh,
        pad_lo_w=plw,
        pad_hi_w=phw,
        groups=groups,
        num_threads=num_threads,
    )
    return {k: np.int64(v) for k, v in values.items()}


def _xla_pass(kind, a, b, params, out_dtype):
    """The pass as plain XLA convolutions (what an exported program contains instead)."""
    strides, pads, groups, x_hw, kernel_shape = params

    def forward(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=_DN, feature_group_count=groups
        )

    if kind == _FWD:
        out = forward(a, b)
    elif kind == _BWD_DATA:
        x_struct = jax.ShapeDtypeStruct((a.shape[0], *x_hw, b.shape[2] * groups), a.dtype)
        (out,) = jax.linear_transpose(lambda x: forward(x, b), x_struct)(a)
    else:
        k_struct = jax.ShapeDtypeStruct(kernel_shape, a.dtype)
        (out,) = jax.linear_transpose(lambda k: forward(a, k), k_struct)(b)
    return out.astype(out_dtype)


# One pass as a primitive: on CPU it lowers to the FFI custom call, except in a program lowered
# for `jax.export` (custom calls have no compatibility guarantee), where it lowers to `_xla_pass`
# as on every other platform.
_pass_p = jax.extend.core.Primitive("sdjax_onednn_conv_pass")


def _pass_abstract_eval(a, b, *, kind, params, out_shape, out_dtype, num_threads):
    del b, kind, params, num_threads
    return jax.core.ShapedArray(out_shape, out_dtype)


def _pass_xla_lowering(ctx, a, b, *, kind, params, out_shape, out_dtype, num_threads):
    del out_shape, num_threads
    xla = functools.partial(_xla_pass, kind, params=params, out_dtype=out_dtype)
    return mlir.lower_fun(xla, multiple_results=False)(ctx, a, b)


def _pass_cpu_lowering(ctx, a, b, *, kind, params, out_shape, out_dtype, num_threads):
    if getattr(ctx.module_context.lowering_parameters, "for_export", False):
        return _pass_xla_lowering(
            ctx,
            a,
            b,
            kind=kind,
            params=params,
            out_shape=out_shape,
            out_dtype=out_dtype,
            num_threads=num_threads,
        )
    strides, pads, groups = params[:3]
    rule = jax.ffi.ffi_lowering(_library.TARGETS[kind])
    return rule(ctx, a, b, **_attrs(strides, pads, groups, num_threads))


def _pass_eager(a, b, **params):
    """Eager evaluation (e.g. ``model.init`` outside ``jax.jit``): the pass, compiled alone."""
    return jax.jit(functools.partial(_pass_p.bind, **params))(a, b)


_pass_p.def_impl(_pass_eager)
_pass_p.def_abstract_eval(_pass_abstract_eval)
mlir.register_lowering(_pass_p, _pass_xla_lowering)
mlir.register_lowering(_pass_p, _pass_cpu_lowering, platform="cpu")


def _result_dtype(kind, dtype):
    # The kernel gradient leaves oneDNN in float32, so that shards sum before rounding.
    return jnp.dtype(jnp.float32) if kind == _BWD_WEIGHTS else jnp.dtype(dtype)


def _raw_call(kind, a, b, params, num_threads):
    out_shape = _result_shape(kind, a.shape, b.shape, params)
    return _pass_p.bind(
        a,
        b,
        kind=kind,
        params=params,
        out_shape=tuple(out_shape),
        out_dtype=_result_dtype(kind, a.dtype),
        num_threads=num_threads,
    )


# Shape of each pass's result from its operands' shapes (per shard: the batch is operand 0's).
def _result_shape(kind, a_shape, b_shape, params):
    strides, pads, groups, x_hw, kernel_shape = params
    if kind == _FWD:
        return (a_shape[0], *_out_hw(a_shape[1:3], b_shape[:2], strides, pads), b_shape[3])
    if kind == _BWD_DATA:
        return (a_shape[0], *x_hw, b_shape[2] * groups)
    return tuple(kernel_shape)


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
    """The mesh axes the batch (leading) dimension is split over, if a NamedSharding says so."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 0:
        return sharding.spec[0]
    return None


def _make_partitioned(kind):
    @functools.partial(custom_partitioning, static_argnums=(2,))
    def call(a, b, params):
        # Unpartitioned (one device, or per shard inside shard_map): the cores are shared by
        # however many CPU devices the process has.
        threads = _num_threads(len(jax.local_devices(backend="cpu")))
        return _raw_call(kind, a, b, params, threads)

    def partition(params, mesh, arg_shapes, result_shape):
        del result_shape
        batch = _batch_axes(arg_shapes[0].sharding)
        act = NamedSharding(mesh, P(batch, None, None, None))
        full = NamedSharding(mesh, P())
        arg_shardings = (act, act if kind == _BWD_WEIGHTS else full)
        out_sharding = full if kind == _BWD_WEIGHTS else act
        threads = _num_threads(len(mesh.local_devices))

        def lower(a, b):
            out = _raw_call(kind, a, b, params, threads)
            if kind == _BWD_WEIGHTS and batch is not None:
                out = jax.lax.psum(out, batch)  # float32 (see _result_dtype)
            return out

        return mesh, lower, out_sharding, arg_shardings

    def infer(params, mesh, arg_shapes, result_shape):
        del params, result_shape
        if kind == _BWD_WEIGHTS:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding), None, None, None))

    rule = {
        _FWD: "n h w c, kh kw i o -> n ho wo o",
        _BWD_DATA: "n ho wo o, kh kw i o -> n h w c",
        _BWD_WEIGHTS: "n h w c, n ho wo o -> kh kw i o",
    }[kind]
    replicated = tuple(f for f in rule.replace(",", " ").replace("->", " ").split() if f != "n")
    call.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(dict.fromkeys(replicated)),
    )
    return call


_PARTITIONED = tuple(_make_partitioned(kind) for kind in (_FWD, _BWD_DATA, _BWD_WEIGHTS))


@functools.cache
def _batchable(kind, params):
    """The pass for static ``params`` with a `jax.vmap` rule (custom_partitioning has none).

    A mapped activation with a shared kernel folds the mapped axis into the batch (one call);
    anything else (a mapped kernel, or the kernel gradient) runs one call per element.
    """

    @jax.custom_batching.custom_vmap
    def call(a, b):
        return _PARTITIONED[kind](a, b, params)

    @call.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if kind != _BWD_WEIGHTS and not b_batched:
            out = call(a.reshape(-1, *a.shape[2:]), b)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        if not a_batched:
            a = jnp.broadcast_to(a, (axis_size, *a.shape))
        if not b_batched:
            b = jnp.broadcast_to(b, (axis_size, *b.shape))
        return jax.lax.map(lambda ab: call(*ab), (a, b)), True

    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _pass(kind, a, b, params):
    """One pass (`_FWD`, `_BWD_DATA` or `_BWD_WEIGHTS`) on operands of one dtype.

    Each pass is bilinear and the transpose of each is another pass, so the VJP is two passes,
    and gradients of any order stay on oneDNN. Empty operands give zeros without a call.
    """
    out_shape = _result_shape(kind, a.shape, b.shape, params)
    out_dtype = a.dtype
    if 0 in a.shape or 0 in b.shape or 0 in out_shape:
        return jnp.zeros(out_shape, out_dtype)
    return _batchable(kind, params)(a, b).astype(out_dtype)


def _pass_fwd(kind, a, b, params):
    return _pass(kind, a, b, params), (a, b)


def _pass_bwd(kind, params, residuals, ct):
    a, b = residuals
    ct = ct.astype(a.dtype)
    if kind == _FWD:  # (x, w) -> y
        da, db = _pass(_BWD_DATA, ct, b, params), _pass(_BWD_WEIGHTS, a, ct, params)
    elif kind == _BWD_DATA:  # (g, w) -> dx
        da, db = _pass(_FWD, ct, b, params), _pass(_BWD_WEIGHTS, ct, a, params)
    else:  # (x, g) -> dw
        da, db = _pass(_BWD_DATA, b, ct, params), _pass(_FWD, a, ct, params)
    return da.astype(a.dtype), db.astype(b.dtype)


_pass.defvjp(_pass_fwd, _pass_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    pads: _Pads,
    feature_group_count: int = 1,
) -> jax.Array:
    """oneDNN convolution, the function `lax.conv_general_dilated` computes (CPU only).

    Arguments are expected already checked (as `sdjax.conv.conv2d` does); call that function
    with ``impl="onednn"`` rather than this one.

    Args:
      x: ``(N, H, W, C)`` input, float32 or bfloat16.
      kernel: ``(KH, KW, C // feature_group_count, O)`` HWIO kernel, the same dtype as ``x``.
      strides: ``(stride_h, stride_w)``, positive.
      pads: ``((lo_h, hi_h), (lo_w, hi_w))``, non-negative (asymmetric allowed).
      feature_group_count: channel groups (lax's grouping), dividing ``C`` and ``O``.

    Returns:
      ``(N, H_out, W_out, O)`` in ``x``'s dtype; bfloat16 is accumulated in float32 by oneDNN,
      and the kernel gradient is accumulated in float32 before it is rounded.

    Raises:
      RuntimeError: the handlers cannot be built or loaded (see `unavailable_reason`).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    strides = tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    groups = int(feature_group_count)
    params = (strides, pads, groups, tuple(x.shape[1:3]), tuple(kernel.shape))
    return _pass(_FWD, x, kernel, params)


def impl_info(
    kind: str,
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: _Pads,
    feature_group_count: int = 1,
    dtype=jnp.float32,
) -> str:
    """The oneDNN implementation name (e.g. ``"jit:avx512_core"``) for one pass of one case.

    Args:
      kind: ``"fwd"``, ``"bwd_data"`` or ``"bwd_weights"``.
      x_shape, kernel_shape, strides, pads, feature_group_count: as for `conv2d`.
      dtype: float32 or bfloat16.

    A batch of 0 is queried as a batch of 1 (`conv2d` makes no oneDNN call for empty operands).

    Raises:
      ValueError: bad ``kind`` or ``dtype``, or a case that is no convolution (shapes, strides,
        padding or ``feature_group_count`` out of range or inconsistent), checked before C.
      RuntimeError: the handlers are unavailable, or oneDNN has no implementation for the case.
    """
    kinds = {"fwd": _FWD, "bwd_data": _BWD_DATA, "bwd_weights": _BWD_WEIGHTS}
    if kind not in kinds:
        raise ValueError(f"impl_info: kind={kind!r} is not valid; allowed values: {list(kinds)}")
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(
            f"impl_info: dtype={dtype} is not valid; allowed values: float32, bfloat16"
        )
    geom = _check_case(x_shape, kernel_shape, strides, pads, feature_group_count)
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    lib = _library.load()
    threads = _num_threads(len(jax.local_devices(backend="cpu")))
    buf = ctypes.create_string_buffer(256)
    arr = (ctypes.c_int64 * len(geom))(*geom)
    bf16 = int(dtype == jnp.bfloat16)
    rc = lib.sdjax_onednn_impl_info(kinds[kind], bf16, arr, threads, buf, len(buf))
    text = buf.value.decode()
    if rc != 0:
        raise RuntimeError(f"impl_info: oneDNN cannot run this case: {text}")
    return text


def _check_case(x_shape, kernel_shape, strides, pads, groups) -> list[int]:
    """The C geometry (n, c, h, w, o, kh, kw, ho, wo, strides, pads, groups) of a valid case.

    A batch of 0 is queried as 1 (the same primitive choice; `conv2d` runs no oneDNN call for
    empty operands). Raises ValueError naming the bad argument.
    """

    def ints(name, values, length, minimum):
        try:
            out = [int(v) for v in values]
        except (TypeError, ValueError):
            out = None
        if out is None or len(out) != length or any(v < minimum for v in out):
            raise ValueError(
                f"impl_info: {name}={values!r} is not valid; allowed values: {length} ints "
                f">= {minimum}"
            )
        return out

    n, h, w, c = ints("x_shape", x_shape, 4, 0)
    kh, kw, ig, o = ints("kernel_shape", kernel_shape, 4, 1)
    sh, sw = ints("strides", strides, 2, 1)
    try:
        (plh, phh), (plw, phw) = pads
    except (TypeError, ValueError):
        plh = None
    if plh is None:
        raise ValueError(f"impl_info: pads={pads!r} is not valid; allowed: ((lo, hi), (lo, hi))")
    plh, phh, plw, phw = ints("pads", (plh, phh, plw, phw), 4, 0)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(
            f"impl_info: feature_group_count={groups!r} is not valid; allowed values: a positive "
            "int dividing the input and output channel counts"
        )
    if min(h, w, c) < 1 or c % groups or o % groups or ig * groups != c:
        raise ValueError(
            f"impl_info: x_shape={tuple(x_shape)}, kernel_shape={tuple(kernel_shape)} and "
            f"feature_group_count={groups} do not fit: need positive H, W, C with "
            "kernel_shape[2] * feature_group_count == C, and groups dividing C and O"
        )
    ho, wo = _out_hw((h, w), (kh, kw), (sh, sw), ((plh, phh), (plw, phw)))
    if h + plh + phh < kh or w + plw + phw < kw:
        raise ValueError(
            f"impl_info: the padded input ({h + plh + phh}, {w + plw + phw}) is smaller than "
            f"the kernel ({kh}, {kw}); the output would be empty"
        )
    return [max(n, 1), c, h, w, o, kh, kw, ho, wo, sh, sw, plh, phh, plw, phw, groups]


_PASSES = ("fwd", "bwd_data", "bwd_weights")


@functools.cache
def _implementations(*case) -> tuple[tuple[str, ...], str | None]:
    """`impl_info` of the three passes of one case, cached per case.

    Returns `(names, None)`, or `((), why)` when a pass has no implementation on this CPU (`why`
    names the failing pass).
    """
    names = []
    for kind in _PASSES:
        try:
            names.append(impl_info(kind, *case))
        except RuntimeError as e:
            return (), f"{kind}: {e}"
    return tuple(names), None


def missing_implementation(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: _Pads,
    feature_group_count: int = 1,
    dtype: str = "float32",
) -> str | None:
    """Why oneDNN cannot run one of the three passes of this case on this CPU, else None.

    E.g. oneDNN 2.x has no bfloat16 convolution at all on CPUs without AVX-512. Cached per case.
    """
    return _implementations(x_shape, kernel_shape, strides, pads, feature_group_count, dtype)[1]


def has_fast_kernels(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: _Pads,
    feature_group_count: int = 1,
    dtype: str = "float32",
) -> bool:
    """True when oneDNN runs all three passes of this case with optimized (non-reference) kernels.

    Reference kernels (``"ref:..."``) are what oneDNN falls back to when the CPU lacks the ISA
    for a case (e.g. bfloat16 without AVX-512); they are far slower than XLA. Cached per case.
    """
    names, missing = _implementations(
        x_shape, kernel_shape, strides, pads, feature_group_count, dtype
    )
    if missing is not None:
        return False
    return not any(name.startswith("ref") for name in names)
