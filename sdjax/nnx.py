"""Dropout and stochastic depth for Flax NNX, built on :mod:`sdjax.ops`.

Same semantics as :mod:`sdjax.layers` (Linen), in the NNX style of ``flax.nnx.Dropout``:

* the key comes from the ``rngs=`` call argument (an ``nnx.Rngs``, an ``nnx.RngStream`` or a key
  array) if given, else from the ``nnx.Rngs(dropout=...)`` stream given at construction (which
  is forked, so the layer owns its own stream and advances it on each call);
* ``deterministic`` is an attribute that ``model.eval()`` sets to True and ``model.train()`` to
  False (also ``nnx.view(model, deterministic=...)``); the call argument overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import ops

__all__ = ["Dropout", "StochasticDepth"]

Array = jax.Array
RngsArg = nnx.Rngs | nnx.RngStream | jax.Array | None


def _fork_stream(rngs: nnx.Rngs | nnx.RngStream | None, rng_collection: str) -> Any:
    if isinstance(rngs, nnx.Rngs):
        return rngs[rng_collection].fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    if rngs is None:
        return nnx.data(None)
    raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream or None, got {type(rngs)}.")


def _check_floating(layer: Any, x: Array) -> None:
    """Raises for a non-floating input on every path (train, eval, rate 0), before any math."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(
            f"{type(layer).__name__} expects a floating-point input, got dtype "
            f"{jnp.result_type(x)} (cast it first, e.g. x.astype(jnp.float32))."
        )


def _resolve_deterministic(call_value: bool | None, attr_value: bool | None, name: str) -> bool:
    value = call_value if call_value is not None else attr_value
    if value is None:
        raise ValueError(
            f"{name}: no `deterministic` given. Pass it to the constructor or the call, or use "
            "`model.train()` / `model.eval()`."
        )
    return bool(value)


def _next_key(layer: Any, rngs: RngsArg) -> Array:
    source = rngs if rngs is not None else layer.rngs
    if isinstance(source, nnx.Rngs):
        return source[layer.rng_collection]()
    if isinstance(source, nnx.RngStream):
        return source()
    if isinstance(source, jax.Array):
        return source
    if source is None:
        raise ValueError(
            f"{type(layer).__name__} is in training mode (deterministic=False) but has no PRNG "
            f"key. Construct it with `rngs=nnx.Rngs({layer.rng_collection}=seed)`, or call it "
            "with `rngs=key`; for evaluation call `model.eval()` or pass deterministic=True."
        )
    raise TypeError(
        f"rngs must be an nnx.Rngs, an nnx.RngStream or a key array, got {type(source)}."
    )


class Dropout(nnx.Module):
    """Inverted dropout for NNX, over :func:`sdjax.ops.dropout`.

    Training (``deterministic=False``): each mask element is kept with probability
    ``1 - rate``, kept values are scaled by ``1 / (1 - rate)``; the mask has ``x``'s shape with
    ``broadcast_dims`` set to 1. Eval: the identity. Shape and dtype are preserved.

    Args:
      rate: the probability of dropping an element, a float in ``[0, 1]``.
      broadcast_dims: axes along which the mask is shared.
      deterministic: the initial mode (False: training); toggled by ``.train()`` / ``.eval()``.
      rng_collection: the name of the rng stream taken from ``rngs``.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        self.rate = ops.check_rate(rate)
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _fork_stream(rngs, rng_collection)

    def __call__(
        self, x: Array, *, deterministic: bool | None = None, rngs: RngsArg = None
    ) -> Array:
        """Applies dropout; see the class docstring.

        Args:
          x: a floating-point array of any shape.
          deterministic: overrides the attribute for this call.
          rngs: overrides the stream given at construction (a Rngs, RngStream or key).

        Returns:
          An array with the shape and dtype of ``x``.

        Raises:
          ValueError: ``x`` is not floating point (on every path, eval and rate 0 included).
        """
        _check_floating(self, x)
        if _resolve_deterministic(deterministic, self.deterministic, "Dropout") or self.rate == 0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        key = _next_key(self, rngs)
        return ops.dropout(x, self.rate, key=key, broadcast_dims=self.broadcast_dims)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: sets ``deterministic`` if given."""
        if deterministic is not None:
            self.deterministic = deterministic


class StochasticDepth(nnx.Module):
    """Drop path (stochastic depth) for NNX, over :func:`sdjax.ops.drop_path`.

    Apply it to a residual branch: ``y = shortcut + sd(branch(x))``. Training: ``mode="row"``
    keeps or zeroes each sample (axis 0) whole; ``mode="batch"`` draws one gate for the whole
    input (the gate of :func:`sdjax.ops.batch_keep`). With ``scale_by_keep`` kept values are
    divided by ``1 - rate``. Eval: the identity, or ``x * (1 - rate)`` when
    ``scale_by_keep=False`` (the paper's convention).

    Args:
      rate: the probability of dropping, a float in ``[0, 1]``.
      mode: ``"row"`` or ``"batch"``.
      scale_by_keep: scale kept values in training (True) or scale at eval (False).
      deterministic: the initial mode (False: training); toggled by ``.train()`` / ``.eval()``.
      rng_collection: the name of the rng stream taken from ``rngs``.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
    """

    def __init__(
        self,
        rate: float,
        *,
        mode: str = "row",
        scale_by_keep: bool = True,
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        if mode not in ops.DROP_PATH_MODES:
            raise ValueError(f"mode must be one of {ops.DROP_PATH_MODES}, got {mode!r}.")
        self.rate = ops.check_rate(rate)
        self.mode = mode
        self.scale_by_keep = bool(scale_by_keep)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _fork_stream(rngs, rng_collection)

    def __call__(
        self, x: Array, *, deterministic: bool | None = None, rngs: RngsArg = None
    ) -> Array:
        """Applies drop path; see the class docstring.

        Args:
          x: a floating-point array; the batch is axis 0 in row mode.
          deterministic: overrides the attribute for this call.
          rngs: overrides the stream given at construction (a Rngs, RngStream or key).

        Returns:
          An array with the shape and dtype of ``x``.

        Raises:
          ValueError: ``x`` is not floating point (on every path, eval and rate 0 included).
        """
        _check_floating(self, x)
        if _resolve_deterministic(deterministic, self.deterministic, "StochasticDepth"):
            if self.scale_by_keep or self.rate == 0:
                return x
            return x * jnp.asarray(1.0 - self.rate, x.dtype)
        if self.rate == 0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        key = _next_key(self, rngs)
        return ops.drop_path(
            x, self.rate, key=key, mode=self.mode, scale_by_keep=self.scale_by_keep
        )

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: sets ``deterministic`` if given."""
        if deterministic is not None:
            self.deterministic = deterministic
