"""Argument checks shared by the pure ops, the Linen layers and the NNX layers.

Each rule is written and explained once, here; :mod:`sdjax.ops`, :mod:`sdjax.row_subset`,
:mod:`sdjax.layers` and :mod:`sdjax.nnx` call these functions (at construction time where they
can, so that a bad value fails before anything compiles). Every message names the argument, the
bad value and the allowed values.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_count",
    "check_floating",
    "check_key",
    "check_min_rate",
    "check_rate",
    "is_array_rate",
]


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


def is_array_rate(rate: Any) -> bool:
    """True for a JAX array rate (possibly traced, e.g. a per-block rate carried through
    ``lax.scan``), which is not validated on the host; False for a host rate.

    Raises:
      ValueError: a JAX array rate that is not 0-d or not floating.
    """
    if isinstance(rate, jax.Array):
        if rate.ndim != 0:
            raise ValueError(f"A JAX array rate must be 0-d (a scalar), got shape {rate.shape}.")
        if not jnp.issubdtype(rate.dtype, jnp.floating):
            raise ValueError(f"A JAX array rate must have a floating dtype, got {rate.dtype}.")
        return True
    return False


def check_min_rate(rate: Any, min_rate: Any, *, row_subset: bool = True) -> float | None:
    """The row-subset rule for ``min_rate``; returns it as a Python float (or None).

    Row-subset stochastic depth runs the branch on ``k = subset_size(L, rate)`` samples, and
    ``k`` must be static. A host ``rate`` fixes it; a JAX array ``rate`` (traced) cannot, so
    ``min_rate``, a Python float lower bound on every rate the call will see (e.g. the
    smallest rate of a scanned stage), fixes ``k_max = subset_size(L, min_rate)`` instead (see
    :func:`sdjax.row_subset.row_subset_residual`). With a host rate ``min_rate`` is optional
    and has no effect, but must still be ``<= rate``.

    Args:
      rate: the drop rate, a host number or a 0-d JAX array.
      min_rate: None or a rate in ``[0, 1]``.
      row_subset: whether the call runs in row-subset mode (only then is ``min_rate`` required
        for an array rate).

    Raises:
      ValueError: an invalid ``min_rate``, ``min_rate > rate``, or an array rate in row-subset
        mode without ``min_rate``.
    """
    array_rate = is_array_rate(rate)
    if min_rate is None:
        if array_rate and row_subset:
            raise ValueError(
                "row_subset with a JAX array rate needs min_rate: a Python float lower bound on "
                "the rate (e.g. the smallest rate of the scanned stage) that fixes the static "
                "subset size; min_rate=0.0 runs the branch on the whole batch."
            )
        return None
    min_rate = check_rate(min_rate, "min_rate")
    if not array_rate and min_rate > float(rate):
        raise ValueError(f"min_rate={min_rate} must be <= rate={rate} (a lower bound).")
    return min_rate


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Checks an integer argument (a count: ``num_shards``, a batch size, ``k``) on the host.

    Returns:
      ``value`` as a Python int.

    Raises:
      ValueError: ``value`` is a bool, not an integer, or below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_floating(x: Any, where: str, what: str = "input") -> None:
    """Raises for a non-floating array on every path (train, eval, rate 0), before any math.

    Args:
      x: the array (or anything ``jnp.result_type`` takes).
      where: the function or layer, for the message.
      what: what ``x`` is (``"input"``, ``"shortcut"``, ``"branch output"``).
    """
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"{where} expects a floating-point {what}, got dtype {dtype} (cast it first, e.g. "
            "x.astype(jnp.float32))."
        )


def check_key(key: Any, where: str) -> None:
    """Raises when a key is needed (``rate > 0``) and ``key`` is None."""
    if key is None:
        raise ValueError(
            f"{where} needs a PRNG key when rate > 0: pass key=jax.random.key(seed) "
            "(or a key split/folded from it)."
        )
