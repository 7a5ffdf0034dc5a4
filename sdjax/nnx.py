"""Dropout and stochastic depth for Flax NNX, built on :mod:`sdjax.ops`.

Same semantics as :mod:`sdjax.layers` (Linen), in the NNX style of ``flax.nnx.Dropout``:

* the key comes from the ``rngs=`` call argument (an ``nnx.Rngs``, an ``nnx.RngStream`` or a key
  array) if given, else from the ``nnx.Rngs(dropout=...)`` stream given at construction (which
  is forked, so the layer owns its own stream and advances it on each call);
* ``deterministic`` is an attribute that ``model.eval()`` sets to True and ``model.train()`` to
  False (also ``nnx.view(model, deterministic=...)``); the call argument overrides it.

Layers: :class:`Dropout`, :class:`StochasticDepth` and :class:`DropPathResidual` (the residual
construct ``shortcut + drop_path(branch(x))`` that skips a dropped branch's compute in batch and
row-subset modes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import checks, ops, row_subset

__all__ = ["DropPathResidual", "Dropout", "StochasticDepth"]

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
        self.rate = checks.check_rate(rate)
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
        checks.check_floating(x, type(self).__name__)
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
        self.rate = checks.check_rate(rate)
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
        checks.check_floating(x, type(self).__name__)
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


class DropPathResidual(nnx.Module):
    """The residual construct for NNX: ``shortcut + drop_path(branch(x, **branch_kwargs))``.

    The same three behaviours as :class:`sdjax.layers.DropPathResidual` (Linen), and the same
    results for the same key:

    * ``mode="row"`` (masked): the branch runs on every sample and its output is masked per
      sample by :func:`sdjax.ops.drop_path` (one Bernoulli(1 - rate) draw per sample).
    * ``mode="batch"``: one gate (:func:`sdjax.ops.batch_keep`) for the whole batch. With
      ``skip_compute`` the training path is an ``nnx.cond``: a dropped branch is not run
      (forward or backward) and its state (BatchNorm ``batch_stats``, rng counts) is left
      unchanged; a kept branch adds ``branch(x) / (1 - rate)`` (no division with
      ``scale_by_keep=False``).
    * ``mode="row_subset"``: exactly ``k`` samples per shard run the branch, the others get
      the shortcut alone (the rule: :mod:`sdjax.row_subset`). A BatchNorm in the branch
      normalises over, and updates its statistics from, the ``k`` kept samples;
      ``branch_kwargs`` are passed as they are (not gathered).

    Eval (``deterministic=True``): ``shortcut + branch(x)``, with the branch times ``1 - rate``
    when ``scale_by_keep=False``. The sum has ``shortcut``'s shape and dtype.

    Args:
      branch: the residual branch, an ``nnx.Module`` called as ``branch(x, **branch_kwargs)``;
        its output has the shape of ``shortcut`` (in row-subset mode, of the gathered rows).
      rate: the probability of dropping the branch: a float in ``[0, 1]``, or a 0-d JAX array
        (e.g. per block of an ``nnx.scan`` over stacked blocks; not validated).
      mode: one of :data:`sdjax.ops.RESIDUAL_MODES`: ``"row"``, ``"batch"`` or ``"row_subset"``.
      scale_by_keep: scale kept branches in training (True) or scale by ``1 - rate`` at eval.
      skip_compute: skip the dropped compute (``nnx.cond`` in batch mode, the subset in
        row-subset mode) (True), or run the branch on everything and mask (False).
      min_rate: row-subset mode: a static lower bound on ``rate``, required for an array rate
        (:func:`sdjax.checks.check_min_rate`).
      num_shards: row-subset mode: the shards of the batch axis (devices) that each draw their
        own subset (:mod:`sdjax.row_subset`).
      deterministic: the initial mode (False: training); toggled by ``.train()`` / ``.eval()``.
      rng_collection: the name of the rng stream taken from ``rngs``.
      rngs: an ``nnx.Rngs`` (its ``rng_collection`` stream is forked) or an ``nnx.RngStream``.
    """

    def __init__(
        self,
        branch: nnx.Module,
        rate: Any,
        *,
        mode: str = "row",
        scale_by_keep: bool = True,
        skip_compute: bool = True,
        min_rate: float | None = None,
        num_shards: int = 1,
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        if mode not in ops.RESIDUAL_MODES:
            raise ValueError(f"mode must be one of {ops.RESIDUAL_MODES}, got {mode!r}.")
        if not isinstance(branch, nnx.Module):
            raise ValueError(f"DropPathResidual.branch must be an nnx.Module, got {branch!r}.")
        array_rate = checks.is_array_rate(rate)
        rate = rate if array_rate else checks.check_rate(rate)
        min_rate = checks.check_min_rate(rate, min_rate, row_subset=mode == "row_subset")
        num_shards = checks.check_count(num_shards, "num_shards")
        self.rate = nnx.data(rate) if array_rate else rate
        self.branch = branch
        self.mode = mode
        self.scale_by_keep = bool(scale_by_keep)
        self.skip_compute = bool(skip_compute)
        self.min_rate = min_rate
        self.num_shards = num_shards
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _fork_stream(rngs, rng_collection)

    def __call__(
        self,
        x: Array,
        shortcut: Array,
        *,
        deterministic: bool | None = None,
        rngs: RngsArg = None,
        **branch_kwargs: Any,
    ) -> Array:
        """Computes ``shortcut + drop_path(branch(x, **branch_kwargs))``; see the class docstring.

        Args:
          x: the branch input, batch on axis 0.
          shortcut: the identity (or projected) path; the output has its shape and dtype.
          deterministic: overrides the attribute for this call.
          rngs: overrides the stream given at construction (a Rngs, RngStream or key).
          **branch_kwargs: passed to the branch.

        Returns:
          The sum, an array with the shape and dtype of ``shortcut``.

        Raises:
          ValueError: ``shortcut`` is not floating point (on every path), or the branch output
            has another shape.
        """
        checks.check_floating(shortcut, type(self).__name__)
        rate = self.rate
        static = isinstance(rate, float)
        if _resolve_deterministic(deterministic, self.deterministic, "DropPathResidual"):
            out = self._run_branch(x, shortcut, branch_kwargs)
            if not self.scale_by_keep:
                out = out * jnp.asarray(1.0 - rate, out.dtype)
            return _add(shortcut, out)
        if static and rate == 0.0:
            return _add(shortcut, self._run_branch(x, shortcut, branch_kwargs))
        key = _next_key(self, rngs)
        if self.mode == "row_subset":
            return row_subset.row_subset_residual(
                lambda rows: self.branch(rows, **branch_kwargs),
                x,
                shortcut,
                rate,
                key=key,
                scale_by_keep=self.scale_by_keep,
                num_shards=self.num_shards,
                min_rate=self.min_rate,
                skip_compute=self.skip_compute,
            )
        if self.mode == "row" or not self.skip_compute:
            out = self._run_branch(x, shortcut, branch_kwargs)
            dropped = ops.drop_path(
                out, rate, key=key, mode=self.mode, scale_by_keep=self.scale_by_keep
            )
            return _add(shortcut, dropped)
        gate = ops.batch_keep(key, rate)
        scale = ops.survival_scale(rate) if self.scale_by_keep else None

        def kept(branch: nnx.Module, x: Array, shortcut: Array) -> Array:
            out = branch(x, **branch_kwargs)
            _check_out_shape(out, shortcut)
            if scale is not None:
                out = out * jnp.asarray(scale, out.dtype)
            return _add(shortcut, out)

        def skipped(branch: nnx.Module, x: Array, shortcut: Array) -> Array:
            del branch, x
            return shortcut

        return nnx.cond(gate, kept, skipped, self.branch, x, shortcut)

    def _run_branch(self, x: Array, shortcut: Array, branch_kwargs: dict[str, Any]) -> Array:
        out = self.branch(x, **branch_kwargs)
        _check_out_shape(out, shortcut)
        return out

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: sets ``deterministic`` if given."""
        if deterministic is not None:
            self.deterministic = deterministic


def _check_out_shape(out: Array, shortcut: Array) -> None:
    if out.shape != shortcut.shape:
        raise ValueError(
            f"DropPathResidual: the branch output has shape {out.shape}, but the shortcut has "
            f"shape {shortcut.shape}; they must be equal."
        )


def _add(shortcut: Array, out: Array) -> Array:
    """``shortcut + out`` in the dtype of ``shortcut`` (the residual stream keeps its dtype)."""
    return (shortcut + out).astype(shortcut.dtype)
