"""oneDNN 2-D convolution for JAX on CPU: forward, input and kernel gradients via XLA FFI.

`conv2d` computes the same function as `lax.conv_general_dilated` with NHWC inputs, HWIO
kernels, window strides, explicit (possibly asymmetric) padding and ``feature_group_count``,
by calling oneDNN kernels through three XLA FFI custom calls tied by a `jax.custom_vjp`.
Each call is wrapped in `jax.experimental.custom_partitioning`: under `jax.jit` with the batch
dimension sharded over several CPU devices, every device convolves its own shard (the kernel
gradient is summed over the batch axes with one all-reduce), so activations are never
gathered. No randomness is involved.

The custom calls exist only for the CPU platform; `sdjax.conv.conv2d` reaches this module
through `lax.platform_dependent`, so programs lowered for GPU/TPU never contain them.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.onednn import library as _library

__all__ = ["DTYPES", "available", "conv2d", "has_fast_kernels", "impl_info", "unavailable_reason"]

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
"""Element types the handlers accept (all operands share one)."""

_FWD, _BWD_DATA, _BWD_WEIGHTS = 0, 1, 2
_Pads = tuple[tuple[int, int], tuple[int, int]]
_STATUS: dict[str, str | None] = {}


def unavailable_reason() -> str | None:
    """Why the oneDNN route cannot be used here, or None when it can.

    The first call builds (if needed) and loads the handlers, which may take several seconds;
    the answer is cached for the process.
    """
    if "reason" not in _STATUS:
        try:
            _library.load()
            _STATUS["reason"] = None
        except RuntimeError as err:
            _STATUS["reason"] = str(err)
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


def _raw_call(kind, a, b, out_shape, strides, pads, groups, num_threads):
    call = jax.ffi.ffi_call(
        _library.TARGETS[kind], jax.ShapeDtypeStruct(out_shape, a.dtype), vmap_method="sequential"
    )
    return call(a, b, **_attrs(strides, pads, groups, num_threads))


# Shape of each pass's result from its operands' shapes (per shard: the batch is operand 0's).
def _result_shape(kind, a_shape, b_shape, params):
    strides, pads, groups, x_hw, kernel_shape = params
    if kind == _FWD:
        return (a_shape[0], *_out_hw(a_shape[1:3], b_shape[:2], strides, pads), b_shape[3])
    if kind == _BWD_DATA:
        return (a_shape[0], *x_hw, b_shape[2] * groups)
    return kernel_shape


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
    """The mesh axes the batch (leading) dimension is split over, if a NamedSharding says so."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 0:
        return sharding.spec[0]
    return None


def _make_partitioned(kind):
    @functools.partial(custom_partitioning, static_argnums=(2,))
    def call(a, b, params):
        out_shape = _result_shape(kind, a.shape, b.shape, params)
        strides, pads, groups = params[:3]
        # Unpartitioned (one device, or per shard inside shard_map): the cores are shared by
        # however many CPU devices the process has.
        threads = _num_threads(len(jax.local_devices(backend="cpu")))
        return _raw_call(kind, a, b, out_shape, strides, pads, groups, threads)

    def partition(params, mesh, arg_shapes, result_shape):
        del result_shape
        batch = _batch_axes(arg_shapes[0].sharding)
        act = NamedSharding(mesh, P(batch, None, None, None))
        full = NamedSharding(mesh, P())
        arg_shardings = (act, act if kind == _BWD_WEIGHTS else full)
        out_sharding = full if kind == _BWD_WEIGHTS else act
        threads = _num_threads(len(mesh.local_devices))
        strides, pads, groups = params[:3]

        def lower(a, b):
            out_shape = _result_shape(kind, a.shape, b.shape, params)
            out = _raw_call(kind, a, b, out_shape, strides, pads, groups, threads)
            if kind == _BWD_WEIGHTS and batch is not None:
                out = jax.lax.psum(out, batch)
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


def _run(kind, a, b, params):
    return _batchable(kind, params)(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, groups):
    params = (strides, pads, groups, x.shape[1:3], kernel.shape)
    return _run(_FWD, x, kernel, params)


def _conv_fwd(x, kernel, strides, pads, groups):
    return _conv(x, kernel, strides, pads, groups), (x, kernel)


def _conv_bwd(strides, pads, groups, residuals, g):
    x, kernel = residuals
    params = (strides, pads, groups, x.shape[1:3], kernel.shape)
    g = g.astype(x.dtype)
    dx = _run(_BWD_DATA, g, kernel, params)
    dkernel = _run(_BWD_WEIGHTS, x, g, params)
    return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


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
    return _conv(x, kernel, strides, pads, int(feature_group_count))


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

    Raises:
      ValueError: bad ``kind`` or ``dtype``.
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
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    lib = _library.load()
    n, h, w, c = x_shape
    kh, kw, _, o = kernel_shape
    ho, wo = _out_hw((h, w), (kh, kw), strides, pads)
    (plh, phh), (plw, phw) = pads
    geom = [n, c, h, w, o, kh, kw, ho, wo, strides[0], strides[1], plh, phh, plw, phw]
    geom.append(feature_group_count)
    buf = ctypes.create_string_buffer(256)
    arr = (ctypes.c_int64 * len(geom))(*[int(v) for v in geom])
    rc = lib.sdjax_onednn_impl_info(kinds[kind], int(dtype == jnp.bfloat16), arr, buf, len(buf))
    text = buf.value.decode()
    if rc != 0:
        raise RuntimeError(f"impl_info: oneDNN cannot run this case: {text}")
    return text


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
