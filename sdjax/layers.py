"""Flax Linen layers for dropout and stochastic depth, built on :mod:`sdjax.ops`.

* :class:`Dropout` -- inverted element-wise dropout (optionally shared along ``broadcast_dims``).
* :class:`StochasticDepth` -- drop path: zeroes whole samples (``"row"``) or the whole input
  (``"batch"``); apply it to a residual branch's output.
* :class:`DropPathResidual` -- the skip construct ``shortcut + drop_path(branch(x))`` that, in
  batch mode, does not run a dropped branch at all (a ``cond``, not a mask): neither forward nor
  backward, and its variables (BatchNorm statistics included) are left untouched; in
  ``"row_subset"`` mode it runs the branch on a fixed-size random subset of the samples only.

PRNG plumbing is explicit: the key comes from the ``rng=`` call argument if given, otherwise from
the ``"dropout"`` rng collection of ``apply`` (``rngs={"dropout": key}``). The training flag is
``deterministic`` (as in Flax): ``True`` is the eval path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import checks, ops, row_subset

__all__ = ["DropPathResidual", "Dropout", "StochasticDepth"]

Array = jax.Array


def _validate_rate(rate: Any, name: str = "rate") -> None:
    """Checks a host rate at construction time; a JAX array rate (traced) is accepted as is."""
    if not checks.is_array_rate(rate):
        checks.check_rate(rate, name)


def _validate_mode(mode: str, allowed: tuple[str, ...] = ops.DROP_PATH_MODES) -> None:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}.")


def _validate_subset_fields(mode: str, rate: Any, min_rate: Any, num_shards: Any) -> None:
    """Checks the row-subset fields (``min_rate``, ``num_shards``) of a residual construct."""
    checks.check_min_rate(rate, min_rate, row_subset=mode == "row_subset")
    checks.check_count(num_shards, "num_shards")


def _is_static_rate(rate: Any, value: float) -> bool:
    return not isinstance(rate, jax.Array) and float(rate) == value


def _eval_scale(rate: Any, scale_by_keep: bool, dtype: Any) -> Any:
    """The eval-path multiplier: 1 with ``scale_by_keep``, else the survival prob ``1 - rate``."""
    if scale_by_keep:
        return None
    if isinstance(rate, jax.Array):
        return (1.0 - rate).astype(dtype)
    return 1.0 - float(rate)


def _get_key(module: nn.Module, rng: Array | None, rng_collection: str) -> Array | None:
    """The key from ``rng=`` or the module's rng collection; None if neither is available."""
    if rng is not None:
        return rng
    if module.has_rng(rng_collection):
        return module.make_rng(rng_collection)
    return None


def _missing_key_error(module: nn.Module, rng_collection: str) -> ValueError:
    return ValueError(
        f"{type(module).__name__} (deterministic=False) needs a PRNG key and the rng collection "
        f"{rng_collection!r} is empty. Pass one with "
        f"`module.apply(variables, x, rngs={{{rng_collection!r}: key}})`, or call the layer "
        f"with `rng=key`; for evaluation use deterministic=True (or train=False in sdjax models)."
    )


class Dropout(nn.Module):
    """Inverted dropout (Linen), over :func:`sdjax.ops.dropout`.

    In training each element of the mask is kept with probability ``1 - rate`` and kept values
    are scaled by ``1 / (1 - rate)``; at eval (``deterministic=True``) the input is returned
    unchanged.

    Attributes:
      rate: the probability of dropping an element, a float in ``[0, 1]`` (or a 0-d JAX array).
      broadcast_dims: axes along which the mask is shared (the mask has size 1 there).
      deterministic: default for the call argument; exactly one of the two must be set.
      rng_collection: the rng collection the key is taken from.
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    def __post_init__(self):
        _validate_rate(self.rate)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool | None = None, rng: Array | None = None
    ) -> Array:
        """Applies dropout.

        Args:
          x: a floating-point array of any shape and dtype.
          deterministic: if True, the identity (eval); if False, drop elements (train).
          rng: an optional PRNG key; if None, one is taken from ``rng_collection``. During
            ``init`` without any key the input is returned unchanged (nothing is dropped).

        Returns:
          An array of the shape and dtype of ``x``.

        Raises:
          ValueError: if ``x`` is not floating point (on every path, eval and rate 0 included),
            or if training and no key is available.
        """
        checks.check_floating(x, type(self).__name__)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or _is_static_rate(self.rate, 0.0):
            return x
        key = _get_key(self, rng, self.rng_collection)
        if key is None:
            if self.is_initializing():
                return x
            raise _missing_key_error(self, self.rng_collection)
        return ops.dropout(x, self.rate, key=key, broadcast_dims=self.broadcast_dims)


class StochasticDepth(nn.Module):
    """Drop path (Linen), over :func:`sdjax.ops.drop_path`; apply it to a residual branch.

    Training: ``mode="row"`` keeps or zeroes each sample (axis 0) as a whole with probability
    ``1 - rate`` / ``rate``; ``mode="batch"`` draws a single gate for the whole input. With
    ``scale_by_keep`` kept values are divided by ``1 - rate``. Eval (``deterministic=True``): the
    identity, or ``x * (1 - rate)`` when ``scale_by_keep=False`` (the paper's convention).

    Attributes:
      rate: the probability of dropping, a float in ``[0, 1]`` (or a 0-d JAX array).
      mode: ``"row"`` or ``"batch"``.
      scale_by_keep: divide kept values by ``1 - rate`` in training (True), or multiply by
        ``1 - rate`` at eval (False).
      deterministic: default for the call argument; exactly one of the two must be set.
      rng_collection: the rng collection the key is taken from.
    """

    rate: float
    mode: str = "row"
    scale_by_keep: bool = True
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    def __post_init__(self):
        _validate_rate(self.rate)
        _validate_mode(self.mode)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: Array, deterministic: bool | None = None, rng: Array | None = None
    ) -> Array:
        """Applies drop path.

        Args:
          x: a floating-point array; the batch is axis 0 in row mode.
          deterministic: if True, the eval path; if False, drop (train).
          rng: an optional PRNG key; if None, one is taken from ``rng_collection``. During
            ``init`` without any key the input is returned unchanged (nothing is dropped).

        Returns:
          An array of the shape and dtype of ``x``.

        Raises:
          ValueError: if ``x`` is not floating point (on every path, eval and rate 0 included),
            or if training and no key is available.
        """
        checks.check_floating(x, type(self).__name__)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic:
            scale = _eval_scale(self.rate, self.scale_by_keep, x.dtype)
            return x if scale is None else x * jnp.asarray(scale, x.dtype)
        if _is_static_rate(self.rate, 0.0):
            return x
        key = _get_key(self, rng, self.rng_collection)
        if key is None:
            if self.is_initializing():
                return x
            raise _missing_key_error(self, self.rng_collection)
        return ops.drop_path(
            x, self.rate, key=key, mode=self.mode, scale_by_keep=self.scale_by_keep
        )


class DropPathResidual(nn.Module):
    """The skip construct: ``shortcut + drop_path(branch(x, **branch_kwargs))``.

    In batch mode with ``skip_compute=True`` the training path is a ``flax.linen.cond`` on the
    gate of :func:`sdjax.ops.batch_keep`: a dropped branch is not computed (forward or
    backward) and its variables (e.g. BatchNorm ``batch_stats``) are left bit-for-bit
    unchanged; a kept branch gives ``shortcut + branch(x) / (1 - rate)`` (or without the
    division when ``scale_by_keep=False``). The result equals the masked version
    (``skip_compute=False``, or ``shortcut + drop_path(branch(x), mode="batch")``) for the same
    key. In row mode the branch always runs and its output is masked per sample.

    Row-subset mode (``mode="row_subset"``): exactly ``k`` samples per shard run the branch
    (forward and backward), the others get the shortcut alone; the rule (``k``, the scale,
    ``num_shards``, an array rate with ``min_rate``, the edges) is :mod:`sdjax.row_subset`'s.
    Unlike ``"row"``, the number kept does not vary and a BatchNorm inside the branch
    normalises over (and updates its statistics from) the ``k`` samples only;
    ``skip_compute=False`` runs the branch on every sample and masks the outputs outside the
    subset (the same result for the same key, without the saving). The branch must accept any
    batch size; ``branch_kwargs`` are passed as they are (not gathered).

    Eval (``deterministic=True``): ``shortcut + branch(x)``, times ``1 - rate`` on the branch
    when ``scale_by_keep=False``. At init the branch always runs (so its variables are created)
    and nothing is dropped.

    The branch becomes the child ``"branch"`` of this module (its variables live under
    ``<this module's name>/branch``). Pass it as a module definition -- a factory such as
    ``functools.partial(MyBranch, features)``, called once with ``parent=None`` -- or as a module
    instance, which is copied (``branch.clone(parent=None, name=None)``) when it is bound to
    another module, e.g. created in the caller's compact method::

        res = DropPathResidual(functools.partial(MyBranch, features), rate=0.2, mode="batch")
        y = res(x, shortcut, deterministic=not train, rng=key, train=train)
        # equivalent: DropPathResidual(MyBranch(features), rate=0.2, mode="batch")

    Extra keyword arguments of the call (here ``train=train``) are passed to the branch. A copied
    branch does not share parameters with the module it was copied from.

    Attributes:
      branch: the residual branch: a Linen module, or a callable returning one (a factory /
        ``ModuleDef``; it is called with ``parent=None``); called as
        ``branch(x, **branch_kwargs)``, its output must be floating point with the shape of
        ``shortcut`` (the sum is returned in ``shortcut``'s dtype).
      rate: the probability of dropping the branch, a float in ``[0, 1]`` or a 0-d JAX array
        (e.g. a per-block rate scanned over blocks).
      mode: ``"batch"`` (one gate for the whole batch; the branch can be skipped), ``"row"``
        (one gate per sample; the branch always runs) or ``"row_subset"`` (exactly ``k``
        samples per shard; the branch runs on those only). See ``sdjax.ops.RESIDUAL_MODES``.
      scale_by_keep: divide a kept branch by ``1 - rate`` in training (True), or multiply it by
        ``1 - rate`` at eval (False, the paper's convention).
      skip_compute: in batch mode, skip a dropped branch with a ``cond`` (True) or compute it
        and mask it (False); in row-subset mode, run the branch on the subset (True) or on every
        sample with the outputs outside the subset masked (False).
      deterministic: default for the call argument; exactly one of the two must be set.
      rng_collection: the rng collection the key is taken from when ``rng`` is not given.
      min_rate: row-subset mode: a static lower bound on ``rate``, required for a JAX array
        rate (:func:`sdjax.checks.check_min_rate`).
      num_shards: row-subset mode: the shards of the batch axis (devices) that each draw their
        own subset (:mod:`sdjax.row_subset`).
    """

    branch: nn.Module | Callable[..., nn.Module]
    rate: float
    mode: str = "row"
    scale_by_keep: bool = True
    skip_compute: bool = True
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    min_rate: float | None = None
    num_shards: int = 1

    def __post_init__(self):
        _validate_rate(self.rate)
        _validate_mode(self.mode, ops.RESIDUAL_MODES)
        _validate_subset_fields(self.mode, self.rate, self.min_rate, self.num_shards)
        # Before Module.__post_init__ (which registers field submodules), make the branch an
        # orphan so that Linen adopts it as this module's child "branch".
        self.branch = _orphan_branch(self.branch)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        shortcut: Array,
        *,
        deterministic: bool | None = None,
        rng: Array | None = None,
        **branch_kwargs: Any,
    ) -> Array:
        """Computes ``shortcut + drop_path(branch(x, **branch_kwargs))``.

        Args:
          x: the branch input.
          shortcut: the identity (or projected) path; the output has its shape.
          deterministic: if True, the eval path; if False, drop (train).
          rng: an optional PRNG key; if None, one is taken from ``rng_collection``. Models pass
            ``jax.random.fold_in(key, global_block_index)`` so scanned and unrolled networks draw
            the same gates.
          **branch_kwargs: passed to the branch (e.g. ``train=...``).

        Returns:
          The sum, an array with the shape and dtype of ``shortcut`` (the residual stream keeps
          its dtype; the branch output is added and the sum cast back).

        Raises:
          ValueError: if training and no key is available, or ``shortcut`` or the branch output
            is not floating point or they differ in shape (on every path).
        """
        checks.check_floating(shortcut, type(self).__name__, "shortcut")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.is_initializing() or deterministic:
            out = self._run_branch(x, shortcut, branch_kwargs)
            if not self.is_initializing():
                scale = _eval_scale(self.rate, self.scale_by_keep, out.dtype)
                out = out if scale is None else out * jnp.asarray(scale, out.dtype)
            return _add(shortcut, out)
        if _is_static_rate(self.rate, 0.0):
            return _add(shortcut, self._run_branch(x, shortcut, branch_kwargs))
        key = _get_key(self, rng, self.rng_collection)
        if key is None:
            raise _missing_key_error(self, self.rng_collection)
        if self.mode == "row_subset":
            return self._subset_branch(x, shortcut, key, branch_kwargs)
        if self.mode == "row" or not self.skip_compute:
            out = self._run_branch(x, shortcut, branch_kwargs)
            return _add(
                shortcut,
                ops.drop_path(
                    out, self.rate, key=key, mode=self.mode, scale_by_keep=self.scale_by_keep
                ),
            )
        return self._cond_branch(x, shortcut, key, branch_kwargs)

    def _run_branch(self, x: Array, shortcut: Array, branch_kwargs: dict[str, Any]) -> Array:
        out = self.branch(x, **branch_kwargs)
        checks.check_floating(out, type(self).__name__, "branch output")
        if out.shape != shortcut.shape:
            raise ValueError(
                f"DropPathResidual: the branch output has shape {out.shape}, but the shortcut "
                f"has shape {shortcut.shape}; they must be equal."
            )
        return out

    def _subset_branch(
        self, x: Array, shortcut: Array, key: Array, branch_kwargs: dict[str, Any]
    ) -> Array:
        """Row-subset mode: the branch on ``k`` samples per shard, scatter-added (see class doc)."""
        return row_subset.row_subset_residual(
            lambda rows: self.branch(rows, **branch_kwargs),
            x,
            shortcut,
            self.rate,
            key=key,
            scale_by_keep=self.scale_by_keep,
            num_shards=self.num_shards,
            min_rate=self.min_rate,
            skip_compute=self.skip_compute,
        )

    def _cond_branch(
        self, x: Array, shortcut: Array, key: Array, branch_kwargs: dict[str, Any]
    ) -> Array:
        """Batch mode with skip_compute: ``nn.cond`` on the batch gate of ``ops.batch_keep``."""
        gate = ops.batch_keep(key, self.rate)
        scale = ops.survival_scale(self.rate) if self.scale_by_keep else None

        def kept(module: DropPathResidual, x: Array, shortcut: Array) -> Array:
            out = module._run_branch(x, shortcut, branch_kwargs)
            if scale is not None:
                out = out * jnp.asarray(scale, out.dtype)
            return _add(shortcut, out)

        def skipped(module: DropPathResidual, x: Array, shortcut: Array) -> Array:
            del module, x
            return shortcut

        # The cond's VJP makes the forward cond output every residual of the kept branch (the
        # skipped side writes zeros of the same shapes). Checkpointing the kept branch with a
        # policy that saves only convolution/matmul outputs cuts those residuals from ~8
        # activations per block to ~3; the cheap elementwise work (BatchNorm, ReLU) is
        # recomputed in the backward cond. Values and gradients are unchanged.
        kept = nn.checkpoint(kept, policy=_save_matmul_outputs, prevent_cse=False)
        return nn.cond(gate, kept, skipped, self, x, shortcut)


_SAVED_PRIMITIVES = frozenset(
    {"conv_general_dilated", "dot_general", "custom_vjp_call", "custom_vjp_call_jaxpr"}
)


def _save_matmul_outputs(prim: Any, *_: Any, **__: Any) -> bool:
    """Checkpoint policy: keep the outputs of convolutions and matrix products as residuals."""
    return prim.name in _SAVED_PRIMITIVES


def _orphan_branch(branch: Any) -> nn.Module:
    """The branch as a module with ``parent=None``, which Linen adopts as the field's child.

    A factory is called with ``parent=None``. A module whose parent is another Linen module
    (created in the caller's compact method or ``setup``) is copied with
    ``clone(parent=None, name=None)``. An orphan, or a branch whose parent is a ``flax.core``
    scope (Linen's own copies of an adopted branch inside ``init``/``apply`` and transforms such
    as ``nn.cond``), is returned as it is.

    Raises:
      ValueError: ``branch`` is neither a Linen module nor a callable returning one.
    """
    if not isinstance(branch, nn.Module):
        made = branch(parent=None) if callable(branch) else None
        if not isinstance(made, nn.Module):
            raise ValueError(
                "DropPathResidual.branch must be a flax.linen Module or a factory returning one "
                f"(e.g. functools.partial(MyBranch, features)), got {branch!r}."
            )
        return made
    if isinstance(branch.parent, nn.Module):
        return branch.clone(parent=None, name=None)
    return branch


def _add(shortcut: Array, out: Array) -> Array:
    """``shortcut + out`` in the dtype of ``shortcut`` (the residual stream keeps its dtype)."""
    return (shortcut + out).astype(shortcut.dtype)
