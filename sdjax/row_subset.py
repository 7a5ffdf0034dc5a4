"""Row-subset stochastic depth: run a residual branch on a fixed-size random subset of samples.

The rule, stated once (``sdjax.layers.DropPathResidual``, ``sdjax.nnx.DropPathResidual`` and the
models' ``drop_mode="row_subset"`` refer here):

* The batch of ``B`` samples is split into ``num_shards`` contiguous shards of ``L = B //
  num_shards`` (``num_shards`` must divide ``B``); with ``num_shards`` equal to the number of
  devices the batch is sharded over, no device needs another's samples, and the shards draw
  different subsets.
* Per shard, ``k = subset_size(L, rate) = max(1, round_half_up((1 - rate) * L))`` samples are
  drawn uniformly without replacement (:func:`subset_indices`); ``k = 0`` for ``rate == 1``.
  The branch runs on the gathered ``num_shards * k`` samples only and ``scale * branch_out`` is
  added to their rows of the shortcut; the other samples get the shortcut alone.
  ``scale = L / k`` with ``scale_by_keep`` (expectation preserved), else 1 (the eval path then
  multiplies the branch by ``1 - rate``).
* An array rate (a 0-d JAX array, e.g. a per-block rate carried through ``lax.scan``): shapes
  must be static, so ``min_rate`` (a Python float lower bound on the rates the call will see;
  the rule is :func:`sdjax.checks.check_min_rate`) fixes ``k_max = subset_size(L, min_rate)``.
  The branch runs on the first ``k_max`` samples of the draw and the ones beyond the traced
  ``k`` are masked out (zero weight, no branch gradient), with ``scale = L / k``. For a
  per-sample branch this equals the host-rate result for the same key (the first ``k`` indices
  of the draw are the same); a BatchNorm in the branch normalises over the ``k_max`` samples. A
  traced rate below ``min_rate`` is treated as ``min_rate`` (``k`` is clipped to ``k_max``;
  still unbiased with ``scale_by_keep``).

Pure functions of their inputs; the randomness comes only from ``key``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import checks

__all__ = ["row_subset_residual", "subset_indices", "subset_keep", "subset_size"]

Array = jax.Array
Rate = Any  # float | 0-d jax.Array


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
    batch = checks.check_count(batch, "batch", 1)
    rate = checks.check_rate(rate)
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
    num_shards = checks.check_count(num_shards, "num_shards", 1)
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
    batch = checks.check_count(batch, "batch", 1)
    local = _local_batch(batch, num_shards)
    k = checks.check_count(k, "k", 0)
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

    The rule (``k``, the scale, the shards, an array rate with ``min_rate``) is the module
    docstring's. Unlike masked row mode (:func:`sdjax.ops.drop_path` ``mode="row"``, an
    independent Bernoulli draw per sample) exactly ``k`` samples per shard are kept; and a
    batch-dependent layer inside the branch (BatchNorm) sees, and normalises over, the kept
    samples only.

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
    traced = checks.is_array_rate(rate)
    if not traced:
        rate = checks.check_rate(rate)
    min_rate = checks.check_min_rate(rate, min_rate)
    checks.check_floating(shortcut, "row_subset_residual", "shortcut")
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
    checks.check_key(key, "row_subset_residual")
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
