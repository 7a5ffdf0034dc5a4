"""Pure JAX dropout and drop-path (stochastic depth) operations.

Everything here is a pure function of its inputs: the randomness comes only from the ``key``
argument, and the same key always gives the same mask. No Flax, no host-side key splitting.

Conventions:

* ``rate`` is the probability of *dropping* (zeroing) an element, a sample or a whole branch;
  ``keep_prob = 1 - rate`` is the survival probability.
* Masks are drawn as raw ``uint32`` random bits compared with the integer threshold
  ``round(keep_prob * 2**32)``: one draw per mask element, no float uniforms. ``keep_prob == 1``
  is handled without overflow (every element kept).
* Keys may be new-style typed keys (``jax.random.key(seed, impl=...)``) or legacy raw ``uint32``
  keys (``jax.random.PRNGKey(seed)``), of any implementation (threefry2x32, rbg, unsafe_rbg).
* ``rate`` is normally a Python float, validated on the host by :func:`check_rate`. It may also be
  a 0-d JAX array (e.g. a per-block rate carried through ``lax.scan``); such a rate is not
  validated, and the edges 0 and 1 are handled with ``jnp.where`` (finite values and gradients).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DROP_PATH_MODES",
    "RESIDUAL_MODES",
    "batch_keep",
    "bernoulli_keep",
    "check_rate",
    "drop_path",
    "dropout",
    "row_subset_residual",
    "subset_indices",
    "subset_keep",
    "subset_size",
    "survival_scale",
]

Array = jax.Array
Rate = Any  # float | 0-d jax.Array

DROP_PATH_MODES = ("row", "batch")
#: The modes of the residual construct (``sdjax.layers.DropPathResidual``,
#: ``sdjax.nnx.DropPathResidual``): the masked modes plus ``"row_subset"``, which runs the branch
#: on a fixed-size random subset of the samples (:func:`row_subset_residual`). ``"row_subset"`` is
#: not a mode of :func:`drop_path`, which only sees the branch output.
RESIDUAL_MODES = ("row", "batch", "row_subset")

_TWO_32 = 2**32
# Largest float32 value strictly below 2**32, used to clamp traced thresholds before the cast
# to uint32 (``float32(2**32 - 1)`` rounds up to 2**32 and would overflow).
_MAX_F32_THRESHOLD = float(np.nextafter(np.float32(_TWO_32), np.float32(0)))


def check_rate(rate: Any, name: str = "rate") -> float:
    """Validates a drop probability given on the host and returns it as a Python float.

    Args:
      rate: the probability of dropping, a real number in ``[0, 1]`` (Python or NumPy scalar,
        or a 0-d NumPy array).
      name: the name of the field, used in the error message.

    Returns:
      ``rate`` as a Python ``float``.

    Raises:
      ValueError: if ``rate`` is a bool, not a real number, NaN, negative or greater than 1.
        The message names the field, the bad value and the allowed values.
    """
    value = rate
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a real number in [0, 1] (the probability of dropping), "
            f"got {rate!r} of type {type(rate).__name__}."
        )
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (the probability of dropping), got {rate!r}.")
    return value


def _is_traced_rate(rate: Any) -> bool:
    """True for a JAX array rate (possibly traced), which is not validated on the host."""
    if isinstance(rate, jax.Array):
        if rate.ndim != 0:
            raise ValueError(f"A JAX array rate must be 0-d (a scalar), got shape {rate.shape}.")
        if not jnp.issubdtype(rate.dtype, jnp.floating):
            raise ValueError(f"A JAX array rate must have a floating dtype, got {rate.dtype}.")
        return True
    return False


def _check_key(key: Any, fn_name: str) -> None:
    if key is None:
        raise ValueError(
            f"{fn_name} needs a PRNG key when rate > 0: pass key=jax.random.key(seed) "
            "(or a key split/folded from it)."
        )


def bernoulli_keep(key: Array, shape: Sequence[int], keep_prob: Rate) -> Array:
    """Draws a boolean keep-mask, ``True`` with probability ``keep_prob``.

    Uses one ``uint32`` of random bits per element, compared with the integer threshold
    ``round(keep_prob * 2**32)``; ``keep_prob == 1`` gives all ``True`` and ``keep_prob == 0``
    all ``False`` (exactly).

    Args:
      key: a PRNG key (typed or raw ``uint32``, any implementation).
      shape: the shape of the mask.
      keep_prob: the probability of ``True``; a Python float in ``[0, 1]`` or a 0-d JAX array
        (traced values outside ``[0, 1]`` are clipped).

    Returns:
      A ``bool`` array of shape ``shape``.
    """
    shape = tuple(shape)
    bits = jax.random.bits(key, shape, dtype=jnp.uint32)
    if _is_traced_rate(keep_prob):
        keep_prob32 = jnp.clip(keep_prob.astype(jnp.float32), 0.0, 1.0)
        threshold = jnp.round(jnp.minimum(keep_prob32 * float(_TWO_32), _MAX_F32_THRESHOLD))
        keep = bits < threshold.astype(jnp.uint32)
        return jnp.logical_or(keep, keep_prob32 >= 1.0)
    keep_prob = check_rate(keep_prob, name="keep_prob")
    threshold = round(keep_prob * _TWO_32)
    if threshold >= _TWO_32:
        return jnp.ones(shape, dtype=jnp.bool_)
    return bits < jnp.uint32(threshold)


def batch_keep(key: Array, rate: Rate) -> Array:
    """The batch-mode gate: a single Bernoulli(1 - rate) draw, ``True`` means keep.

    This is the one gate used by ``drop_path(..., mode="batch")`` and by
    ``sdjax.layers.DropPathResidual``, so the same key gives the same decision in both.

    Args:
      key: a PRNG key (typed or raw ``uint32``, any implementation).
      rate: the probability of dropping; a Python float in ``[0, 1]`` or a 0-d JAX array.

    Returns:
      A ``bool`` scalar array (shape ``()``).
    """
    return bernoulli_keep(key, (), _keep_prob(rate))


def _keep_prob(rate: Rate) -> Rate:
    if _is_traced_rate(rate):
        return 1.0 - rate
    return 1.0 - check_rate(rate)


def survival_scale(rate: Rate) -> Rate:
    """The training scale ``1 / (1 - rate)`` of kept values; 0 when ``rate == 1``.

    Args:
      rate: a Python float in ``[0, 1]`` (validated) or a 0-d JAX array (traced).

    Returns:
      A Python float, or a 0-d float array for an array rate; always finite.
    """
    return _safe_inverse(_keep_prob(rate))


def _safe_inverse(keep_prob: Rate) -> Rate:
    """``1 / keep_prob``, and 0 where ``keep_prob == 0`` (so gradients stay finite)."""
    if _is_traced_rate(keep_prob):
        positive = keep_prob > 0
        return jnp.where(positive, 1.0 / jnp.where(positive, keep_prob, 1.0), 0.0)
    return 1.0 / keep_prob if keep_prob > 0 else 0.0


def _check_floating(x: Array, fn_name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(f"{fn_name} expects a floating-point input, got dtype {x.dtype}.")


def _apply_mask(x: Array, keep: Array, scale: Rate) -> Array:
    """``where(keep, x * scale, 0)`` in the dtype of ``x``; ``keep`` broadcasts against ``x``."""
    if isinstance(scale, float) and scale == 1.0:
        kept = x
    else:
        kept = x * jnp.asarray(scale, dtype=x.dtype)
    return jnp.where(keep, kept, jnp.zeros((), dtype=x.dtype))


def dropout(
    x: Array,
    rate: Rate,
    *,
    key: Array | None,
    broadcast_dims: Sequence[int] = (),
) -> Array:
    """Inverted dropout: zeroes elements with probability ``rate``, scales the rest by 1/(1-rate).

    Args:
      x: a floating-point array of any shape and dtype (bf16, fp16, fp32, ...).
      rate: the probability of dropping an element; a Python float in ``[0, 1]`` or a 0-d JAX
        array (traced; not validated).
      key: a PRNG key; may be ``None`` only when ``rate`` is the Python number 0.
      broadcast_dims: axes along which the mask is shared (size 1 in the mask), e.g. ``(1, 2)``
        for NHWC inputs gives one draw per (sample, channel). Negative axes are allowed.

    Returns:
      An array with the shape and dtype of ``x``: ``x / (1 - rate)`` where kept, 0 where dropped.
      Randomness: one Bernoulli(1 - rate) draw per element of the mask, whose shape is ``x.shape``
      with ``broadcast_dims`` set to 1. Edges: rate 0 returns ``x`` itself; rate 1 returns zeros
      (with zero, finite gradients).

    Raises:
      ValueError: for an invalid rate, an out-of-range or repeated broadcast dim, a non-floating
        input or a missing key.
    """
    traced = _is_traced_rate(rate)
    if not traced:
        rate = check_rate(rate)
        if rate == 0.0:
            return x
    _check_floating(x, "dropout")
    dims = set()
    for d in broadcast_dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not -x.ndim <= d < x.ndim:
            raise ValueError(
                f"broadcast_dims must be axes of x (rank {x.ndim}), got {tuple(broadcast_dims)}."
            )
        if d % x.ndim in dims:
            raise ValueError(f"broadcast_dims has a repeated axis: {tuple(broadcast_dims)}.")
        dims.add(int(d) % x.ndim)
    if not traced and rate == 1.0:
        return jnp.zeros_like(x)
    _check_key(key, "dropout")
    keep_prob = _keep_prob(rate)
    mask_shape = tuple(1 if i in dims else n for i, n in enumerate(x.shape))
    keep = bernoulli_keep(key, mask_shape, keep_prob)
    return _apply_mask(x, keep, _safe_inverse(keep_prob))


def drop_path(
    x: Array,
    rate: Rate,
    *,
    key: Array | None,
    mode: str = "row",
    scale_by_keep: bool = True,
) -> Array:
    """Drop path (stochastic depth): zeroes whole samples (``"row"``) or the whole input (``"batch"``).

    Apply it to the output of a residual branch: ``shortcut + drop_path(branch(x), ...)``.

    Args:
      x: a floating-point array; for ``mode="row"`` of rank >= 1 with the batch on axis 0.
      rate: the probability of dropping; a Python float in ``[0, 1]`` or a 0-d JAX array (traced;
        not validated, edges handled with ``jnp.where``).
      key: a PRNG key (typed or raw, any implementation); may be ``None`` only when ``rate`` is
        the Python number 0.
      mode: ``"row"``: one Bernoulli(1 - rate) draw per sample along axis 0, broadcast over the
        other axes (timm / EfficientNet convention). ``"batch"``: a single draw for the whole
        input (Huang et al. 2016), the same gate as :func:`batch_keep` for the same key.
      scale_by_keep: if True, kept values are divided by ``1 - rate`` (expectation preserved); if
        False, kept values are left as they are (the paper's convention; the eval path then
        multiplies by ``1 - rate``).

    Returns:
      An array with the shape and dtype of ``x``. Edges: rate 0 returns ``x`` itself; rate 1
      returns zeros (with zero, finite gradients).

    Raises:
      ValueError: for an invalid rate or mode, a rank-0 input in row mode, a non-floating input
        or a missing key.
    """
    if mode not in DROP_PATH_MODES:
        raise ValueError(f"mode must be one of {DROP_PATH_MODES}, got {mode!r}.")
    traced = _is_traced_rate(rate)
    if not traced:
        rate = check_rate(rate)
        if rate == 0.0:
            return x
    _check_floating(x, "drop_path")
    if mode == "row" and x.ndim < 1:
        raise ValueError("drop_path(mode='row') needs an input of rank >= 1 (batch on axis 0).")
    if not traced and rate == 1.0:
        return jnp.zeros_like(x)
    _check_key(key, "drop_path")
    keep_prob = _keep_prob(rate)
    if mode == "row":
        keep = bernoulli_keep(key, (x.shape[0],), keep_prob)
        keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    else:
        keep = batch_keep(key, rate)
    scale = _safe_inverse(keep_prob) if scale_by_keep else 1.0
    return _apply_mask(x, keep, scale)


# --- Row-subset stochastic depth: run the branch on a fixed-size subset of the samples. ---------


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def subset_size(batch: int, rate: float) -> int:
    """The number ``k`` of samples that row-subset stochastic depth keeps out of ``batch``.

    ``k = max(1, round_half_up((1 - rate) * batch))`` for ``rate < 1``, so at least one sample
    runs the branch however small the batch; ``k = 0`` for ``rate == 1`` (the branch is always
    dropped, as in the masked modes). The product is computed in float32, exactly as the traced
    path of :func:`row_subset_residual` computes it from a 0-d float32 rate, so a rate given as a
    Python float and the same rate carried through ``lax.scan`` give the same ``k``.

    Args:
      batch: the number of samples the subset is drawn from (per device shard), an int >= 1.
      rate: the probability of dropping, a real number in ``[0, 1]``.

    Returns:
      ``k``, a Python int in ``[0, batch]``; ``batch`` for ``rate == 0``.

    Raises:
      ValueError: for a batch that is not a positive int, or an invalid rate (the message names
        the field, the value and the allowed values).
    """
    batch = _check_count(batch, "batch", 1)
    rate = check_rate(rate)
    if rate == 1.0:
        return 0
    kept = (np.float32(1.0) - np.float32(rate)) * np.float32(batch)
    return max(1, int(np.floor(kept + np.float32(0.5))))


def _traced_subset_size(batch: int, rate: Array, k_max: int) -> Array:
    """:func:`subset_size` for a 0-d JAX rate, clipped to ``[0, k_max]`` (an int32 0-d array)."""
    rate32 = jnp.clip(rate.astype(jnp.float32), 0.0, 1.0)
    kept = jnp.floor((1.0 - rate32) * jnp.float32(batch) + 0.5).astype(jnp.int32)
    k = jnp.where(rate32 >= 1.0, 0, jnp.maximum(kept, 1))
    return jnp.minimum(k, k_max)


def _local_batch(batch: int, num_shards: int) -> int:
    num_shards = _check_count(num_shards, "num_shards", 1)
    if batch % num_shards:
        raise ValueError(
            f"num_shards={num_shards} must divide the batch size {batch} (the subset is drawn "
            "per shard of batch // num_shards samples)."
        )
    return batch // num_shards


def subset_indices(key: Array, batch: int, k: int, *, num_shards: int = 1) -> Array:
    """Draws ``k`` sample indices per shard, uniformly without replacement.

    The batch is split into ``num_shards`` contiguous shards of ``batch // num_shards`` samples
    (the layout of a batch sharded over devices along axis 0); each shard draws its own subset,
    so no shard needs another's samples. One ``uint32`` of random bits is drawn per sample
    (shape ``(num_shards, batch // num_shards)``) and the ``k`` largest are taken with
    ``lax.top_k``: every ``k``-subset is equally likely (ties in the 32-bit draws, probability
    below ``batch**2 / 2**33``, are broken by the lower index). The indices come in the order
    of their draws, so the first ``j`` columns are the subset of size ``j`` drawn from the same
    key (what the traced-rate path of :func:`row_subset_residual` relies on).

    Args:
      key: a PRNG key (typed or raw ``uint32``, any implementation).
      batch: the global batch size, an int >= 1, divisible by ``num_shards``.
      k: the number of samples per shard, an int in ``[0, batch // num_shards]``.
      num_shards: the number of shards of axis 0 (e.g. the devices the batch is sharded over).

    Returns:
      An ``int32`` array of shape ``(num_shards, k)``: indices into each shard, in
      ``[0, batch // num_shards)``, distinct within a row.

    Raises:
      ValueError: for a non-positive batch or num_shards, a num_shards that does not divide the
        batch, or ``k`` outside ``[0, batch // num_shards]``.
    """
    batch = _check_count(batch, "batch", 1)
    local = _local_batch(batch, num_shards)
    k = _check_count(k, "k", 0)
    if k > local:
        raise ValueError(
            f"k={k} must be in [0, {local}] (the samples per shard: batch {batch} / num_shards "
            f"{num_shards})."
        )
    if k == 0:
        return jnp.zeros((num_shards, 0), dtype=jnp.int32)
    bits = jax.random.bits(key, (num_shards, local), dtype=jnp.uint32)
    if num_shards == 1:
        return jax.lax.top_k(bits, k)[1].astype(jnp.int32)
    return _top_k_indices_by_rank(bits, k)


def _top_k_indices_by_rank(bits: Array, k: int) -> Array:
    """``lax.top_k(bits, k)[1]`` (ties to the lower index) from pairwise comparisons per row.

    Only elementwise work and reductions within a row, so a ``bits`` sharded over rows stays
    on its devices (XLA replicates the sort behind ``lax.top_k`` instead). Cost ``O(L**2)`` per
    row of ``L`` entries.
    """
    local = bits.shape[1]
    pos = jnp.arange(local, dtype=jnp.int32)
    a, b = bits[:, :, None], bits[:, None, :]  # a: entry i, b: entry j
    ahead = (b > a) | ((b == a) & (pos[None, None, :] < pos[None, :, None]))
    rank = jnp.sum(ahead, axis=2, dtype=jnp.int32)  # (S, L): entries drawn before entry i
    slot = jnp.arange(k, dtype=jnp.int32)
    hit = rank[:, :, None] == slot[None, None, :]  # (S, L, k)
    return jnp.sum(jnp.where(hit, pos[None, :, None], 0), axis=1, dtype=jnp.int32)


def subset_keep(key: Array, batch: int, k: int, *, num_shards: int = 1) -> Array:
    """The keep-mask of :func:`subset_indices`: ``True`` for the ``k`` drawn samples per shard.

    Args:
      key, batch, k, num_shards: as in :func:`subset_indices`.

    Returns:
      A ``bool`` array of shape ``(batch,)`` with exactly ``k`` ``True`` per shard.
    """
    idx = subset_indices(key, batch, k, num_shards=num_shards)
    local = batch // num_shards
    keep = jax.vmap(lambda i: jnp.zeros((local,), jnp.bool_).at[i].set(True))(idx)
    return keep.reshape((batch,))


def _row_index(idx: Array, ndim: int) -> Array:
    """``idx`` ``(S, k)`` as a ``take_along_axis`` index of rank ``ndim + 1`` (axis 1)."""
    return idx.reshape(idx.shape + (1,) * (ndim - 1))


def _gather_rows(x: Array, idx: Array) -> Array:
    """``x`` of shape ``(S * L, ...)``, ``idx`` of shape ``(S, k)`` -> ``(S * k, ...)``."""
    shards, k = idx.shape
    xs = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
    taken = jnp.take_along_axis(xs, _row_index(idx, x.ndim), axis=1, mode="promise_in_bounds")
    return taken.reshape((shards * k,) + x.shape[1:])


def _scatter_add_rows(base: Array, idx: Array, updates: Array) -> Array:
    """Adds ``updates`` ``(S * k, ...)`` to the rows ``idx`` ``(S, k)`` of ``base`` ``(S * L, ...)``.

    The shard axis is a batching dimension of the scatter (not an index), so a batch sharded
    over devices along that axis is updated in place on each device.
    """
    shards, k = idx.shape
    rows = base.reshape((shards, base.shape[0] // shards) + base.shape[1:])
    upd = updates.reshape((shards, k) + updates.shape[1:])
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(2, upd.ndim)),
        inserted_window_dims=(1,),
        scatter_dims_to_operand_dims=(1,),
        operand_batching_dims=(0,),
        scatter_indices_batching_dims=(0,),
    )
    added = jax.lax.scatter_add(
        rows,
        idx[..., None],
        upd,
        dnums,
        indices_are_sorted=False,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return added.reshape(base.shape)


def _check_branch_out(out: Array, expected: tuple[int, ...]) -> None:
    if out.shape != expected:
        raise ValueError(
            f"row_subset_residual: the branch output has shape {out.shape}, expected {expected} "
            "(the shortcut's shape, with the batch axis cut to the samples the branch was run on)."
        )


def row_subset_residual(
    branch_fn: Any,
    x: Array,
    shortcut: Array,
    rate: Rate,
    *,
    key: Array | None,
    scale_by_keep: bool = True,
    num_shards: int = 1,
    min_rate: float | None = None,
    skip_compute: bool = True,
) -> Array:
    """Row-subset stochastic depth: ``shortcut`` plus the branch run on ``k`` random samples.

    Per shard of ``L = B // num_shards`` samples, ``k = subset_size(L, rate)`` samples are drawn
    uniformly without replacement (:func:`subset_indices`); ``branch_fn`` runs on the gathered
    ``num_shards * k`` samples only, and ``scale * branch_out`` is scatter-added into their rows
    of ``shortcut``; the other samples get ``shortcut`` alone. ``scale = L / k`` with
    ``scale_by_keep`` (expectation preserved), else 1 (the eval path then multiplies the branch
    by ``1 - rate``). Unlike masked row mode (:func:`drop_path` ``mode="row"``, an independent
    Bernoulli draw per sample) exactly ``k`` samples per shard are kept; and a batch-dependent
    layer inside the branch (BatchNorm) sees, and normalises over, the kept samples only.

    Sharding: the gather and scatter are shard-local (the batch is viewed as
    ``(num_shards, L, ...)``), so with ``num_shards`` equal to the number of devices the batch is
    sharded over, no device needs another's samples; the shards draw different subsets.

    Traced rate (``rate`` a 0-d JAX array, e.g. a per-block rate carried through ``lax.scan``):
    shapes must be static, so ``min_rate`` (a Python float, a lower bound on the rates the call
    will see, e.g. the smallest rate of a scanned stage) fixes ``k_max = subset_size(L,
    min_rate)``. The branch runs on the first ``k_max`` samples of the draw and the ones beyond
    the traced ``k`` are masked out (zero weight; they get no branch gradient), with ``scale = L /
    k``. For a per-sample branch this equals the static-rate result for the same key (the first
    ``k`` indices of the draw are the same); a BatchNorm in the branch normalises over the
    ``k_max`` samples. A traced rate below ``min_rate`` is treated as ``min_rate`` (``k`` is
    clipped to ``k_max``; still an unbiased estimate with ``scale_by_keep``).

    Args:
      branch_fn: the residual branch, a callable ``(n, ...) -> (n,) + shortcut.shape[1:]`` that
        treats samples independently of their count ``n`` (it is called once, on the gathered
        samples; on all of ``x`` when nothing is dropped or with ``skip_compute=False``).
      x: the branch input, batch on axis 0 (``B`` samples); any dtype ``branch_fn`` accepts.
      shortcut: the identity (or projected) path, a floating array with ``B`` rows; the result
        has its shape and dtype.
      rate: the probability of dropping; a Python float in ``[0, 1]`` or a 0-d JAX array.
      key: a PRNG key; may be ``None`` only when nothing is drawn (rate 0 or 1 as Python floats).
      scale_by_keep: scale the kept branch outputs by ``L / k`` (True) or leave them (False).
      num_shards: the number of contiguous shards of axis 0 that draw their own subsets.
      min_rate: a static lower bound on ``rate``; required for a traced rate, optional (and
        checked to be <= rate) for a Python float rate, where it has no effect.
      skip_compute: run the branch on the subset only (True), or on every sample with the
        outputs outside the subset masked to zero (False: the masked equivalent, the same result
        for a per-sample branch and the same key).

    Returns:
      An array with the shape and dtype of ``shortcut``; the sum is formed in the promoted dtype
      of shortcut and branch output and cast back. Edges (Python float rates): ``k == L`` (rate
      0, or a rate so small that rounding keeps everyone) runs the branch on the whole batch
      with scale 1 and no gather; rate 1 (``k = 0``) returns ``shortcut`` without calling the
      branch.

    Raises:
      ValueError: for an invalid rate or min_rate, ``min_rate > rate``, a traced rate without
        ``min_rate``, a non-floating or rank-0 shortcut, mismatched batch sizes, a num_shards that
        does not divide the batch, a missing key or a branch output of the wrong shape.
    """
    traced = _is_traced_rate(rate)
    if not traced:
        rate = check_rate(rate)
    if min_rate is not None:
        min_rate = check_rate(min_rate, "min_rate")
        if not traced and min_rate > rate:
            raise ValueError(f"min_rate={min_rate} must be <= rate={rate} (a lower bound).")
    elif traced:
        raise ValueError(
            "row_subset_residual with a traced (JAX array) rate needs min_rate: a Python float "
            "lower bound on the rate (e.g. the smallest rate of the scanned stage) that fixes "
            "the static subset size; min_rate=0.0 runs the branch on the whole batch."
        )
    _check_floating(shortcut, "row_subset_residual")
    if shortcut.ndim < 1 or jnp.ndim(x) < 1 or x.shape[0] != shortcut.shape[0]:
        raise ValueError(
            "row_subset_residual needs x and shortcut with the batch on axis 0 and the same "
            f"batch size, got shapes {jnp.shape(x)} and {shortcut.shape}."
        )
    batch = shortcut.shape[0]
    local = _local_batch(batch, num_shards)
    if traced:
        k_max = subset_size(local, min_rate)
    else:
        k_max = subset_size(local, rate)
    if k_max == 0:
        return shortcut
    if not traced and k_max == local:
        out = branch_fn(x)
        _check_branch_out(out, shortcut.shape)
        return _sum(shortcut, out)
    _check_key(key, "row_subset_residual")
    idx = subset_indices(key, batch, k_max, num_shards=num_shards)
    if traced:
        k = _traced_subset_size(local, rate, k_max)
        scale = jnp.where(k > 0, local / jnp.maximum(k, 1).astype(jnp.float32), 0.0)
        weights = jnp.where(jnp.arange(k_max) < k, scale if scale_by_keep else 1.0, 0.0)
    else:
        scale = local / k_max if scale_by_keep else 1.0
        weights = jnp.full((k_max,), scale, dtype=jnp.float32)
    if skip_compute:
        out = branch_fn(_gather_rows(x, idx))
        _check_branch_out(out, (num_shards * k_max,) + shortcut.shape[1:])
        if traced:
            w = jnp.tile(weights, num_shards).reshape((-1,) + (1,) * (out.ndim - 1))
            out = jnp.where(w != 0, out * w.astype(out.dtype), jnp.zeros((), out.dtype))
        elif scale != 1.0:
            out = out * jnp.asarray(scale, out.dtype)
        dtype = jnp.result_type(shortcut, out)
        total = _scatter_add_rows(shortcut.astype(dtype), idx, out.astype(dtype))
        return total.astype(shortcut.dtype)
    out = branch_fn(x)
    _check_branch_out(out, shortcut.shape)
    sample_w = jax.vmap(lambda i: jnp.zeros((local,), jnp.float32).at[i].set(weights))(idx)
    w = sample_w.reshape((batch,) + (1,) * (out.ndim - 1))
    out = jnp.where(w != 0, out * w.astype(out.dtype), jnp.zeros((), out.dtype))
    return _sum(shortcut, out)


def _sum(shortcut: Array, out: Array) -> Array:
    return (shortcut + out).astype(shortcut.dtype)
