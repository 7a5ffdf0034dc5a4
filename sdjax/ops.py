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
* ``rate`` is normally a Python float, validated on the host by
  :func:`sdjax.checks.check_rate`. It may also be a 0-d JAX array (e.g. a per-block rate
  carried through ``lax.scan``); such a rate is not validated, and the edges 0 and 1 are
  handled with ``jnp.where`` (finite values and gradients).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import checks

__all__ = [
    "DROP_PATH_MODES",
    "RESIDUAL_MODES",
    "batch_keep",
    "bernoulli_keep",
    "drop_path",
    "dropout",
    "survival_scale",
]

Array = jax.Array
Rate = Any  # float | 0-d jax.Array

DROP_PATH_MODES = ("row", "batch")
#: The modes of the residual construct (``sdjax.layers.DropPathResidual``,
#: ``sdjax.nnx.DropPathResidual``): the masked modes plus ``"row_subset"``, which runs the branch
#: on a fixed-size random subset of the samples (:mod:`sdjax.row_subset`). ``"row_subset"`` is
#: not a mode of :func:`drop_path`, which only sees the branch output.
RESIDUAL_MODES = ("row", "batch", "row_subset")

_TWO_32 = 2**32
# Largest float32 value strictly below 2**32, used to clamp traced thresholds before the cast
# to uint32 (``float32(2**32 - 1)`` rounds up to 2**32 and would overflow).
_MAX_F32_THRESHOLD = float(np.nextafter(np.float32(_TWO_32), np.float32(0)))


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
    if checks.is_array_rate(keep_prob):
        keep_prob32 = jnp.clip(keep_prob.astype(jnp.float32), 0.0, 1.0)
        threshold = jnp.round(jnp.minimum(keep_prob32 * float(_TWO_32), _MAX_F32_THRESHOLD))
        keep = bits < threshold.astype(jnp.uint32)
        return jnp.logical_or(keep, keep_prob32 >= 1.0)
    keep_prob = checks.check_rate(keep_prob, name="keep_prob")
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
    if checks.is_array_rate(rate):
        return 1.0 - rate
    return 1.0 - checks.check_rate(rate)


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
    if checks.is_array_rate(keep_prob):
        positive = keep_prob > 0
        return jnp.where(positive, 1.0 / jnp.where(positive, keep_prob, 1.0), 0.0)
    return 1.0 / keep_prob if keep_prob > 0 else 0.0


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
    traced = checks.is_array_rate(rate)
    if not traced:
        rate = checks.check_rate(rate)
        if rate == 0.0:
            return x
    checks.check_floating(x, "dropout")
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
    checks.check_key(key, "dropout")
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
    traced = checks.is_array_rate(rate)
    if not traced:
        rate = checks.check_rate(rate)
        if rate == 0.0:
            return x
    checks.check_floating(x, "drop_path")
    if mode == "row" and x.ndim < 1:
        raise ValueError("drop_path(mode='row') needs an input of rank >= 1 (batch on axis 0).")
    if not traced and rate == 1.0:
        return jnp.zeros_like(x)
    checks.check_key(key, "drop_path")
    keep_prob = _keep_prob(rate)
    if mode == "row":
        keep = bernoulli_keep(key, (x.shape[0],), keep_prob)
        keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    else:
        keep = batch_keep(key, rate)
    scale = _safe_inverse(keep_prob) if scale_by_keep else 1.0
    return _apply_mask(x, keep, scale)
