"""Stages of identical blocks, unrolled or scanned, and the converters between the two layouts.

:func:`apply_stage` applies a stage's first block and then its identical remaining blocks, either
one submodule per block or with one ``nn.scan`` (optionally ``nn.remat``); both layouts draw the
same drop gates because every block derives its key as ``fold_in(model_key, block_index)``.

Naming convention of stages (the contract of the two converters): the first block of a stage is
the submodule ``"<stage>_block0"``; the remaining ``n - 1`` blocks are ``"<stage>_block1"`` ...
``"<stage>_block<n-1>"`` when unrolled, or one scanned submodule ``"<stage>_rest"`` whose
variables carry a leading axis of size ``n - 1`` when scanned.

Row-subset mode (``drop_mode="row_subset"``) needs a static subset size, while a scanned block's
rate is a traced array. The scanned blocks of a stage share one scan body by padding: each
gets ``min_rate = min(rates[1:])`` (static), so the branch runs on the stage's largest ``k``
samples and the samples beyond the block's own ``k`` are masked out (they get the shortcut
only and no branch gradient). A BatchNorm in the branch therefore normalises over the ``k_max``
samples of the stage, not over the block's ``k``; an unrolled block (and the first block of a
stage) uses its own rate as ``min_rate`` and runs on exactly its ``k``. With depth-growing rates
one padded scan saves little (ViT-S/16 at rate 0.4: the 11 scanned blocks all run on 15 of 16
samples), so ``max_subset_groups > 1`` (the LayerNorm families' ``subset_scan_groups``) splits
the scanned blocks into consecutive groups (:func:`subset_groups`), each scanned over its slice
of the stacked parameters and padded to its own ``k_max`` only: the same result, the same
parameter layout, one compiled scan body per group. With a
``drop_rate_scale`` the rates are ``rate * scale`` for a traced scale that may be below 1 (a
smaller rate keeps more samples), so every block gets ``min_rate = 0``: the branch runs padded
to the whole batch (no compute saving while a scale is given) and each block still keeps
exactly its own ``k``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.base import scale_rate

__all__ = ["apply_stage", "scan_to_unrolled", "subset_groups", "unrolled_to_scan"]

Array = jax.Array


def _scan_body(
    block: nn.Module, x: Array, xs: tuple[Array, Array], key: Array | None, extra: tuple = ()
):
    """One scanned block; ``extra``: the call's optional ``(min_rate,)``."""
    rate, block_index = xs
    return block(x, rate, block_index, key, *extra), None


def subset_groups(rates: Sequence[float], max_groups: int) -> list[tuple[int, int]]:
    """Splits blocks ``0..n-1`` into at most ``max_groups`` contiguous ``[lo, hi)`` groups.

    The split minimises the padded row-subset work ``sum over groups of (hi - lo) * (1 -
    min(rates[lo:hi]))`` (each group's blocks run on the group's largest subset), by dynamic
    programming; ties prefer fewer groups. Equal rates (the uniform rule) give one group.

    Args:
      rates: the blocks' drop rates (Python floats), in order.
      max_groups: the most groups allowed, an int >= 1.

    Returns:
      The groups in order, covering ``0..len(rates)``; ``[]`` for no rates.
    """
    n = len(rates)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][i]: least cost of blocks 0..i-1 in g groups; cut[g][i]: where the last group starts.
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for i in range(1, n + 1):
            low = inf
            for j in range(i - 1, -1, -1):
                low = min(low, rates[j])
                cost = best[g - 1][j] + (i - j) * (1.0 - low)
                if cost < best[g][i] - 1e-12:
                    best[g][i], cut[g][i] = cost, j
    groups_used = min(range(1, max_groups + 1), key=lambda g: (round(best[g][n], 9), g))
    out, i = [], n
    for g in range(groups_used, 0, -1):
        out.append((cut[g][i], i))
        i = cut[g][i]
    return out[::-1]


def apply_stage(
    block_cls: type[nn.Module],
    x: Array,
    *,
    name: str,
    first_kwargs: Mapping[str, Any],
    rest_kwargs: Mapping[str, Any],
    rates: Sequence[float],
    first_index: int,
    key: Array | None,
    scan_blocks: bool,
    remat: bool,
    drop_rate_scale: Array | None = None,
    max_subset_groups: int = 1,
) -> Array:
    """Applies the ``len(rates)`` blocks of one stage (call from a compact method).

    The block modules are called as ``block(x, rate, block_index, key)`` (with
    ``max_subset_groups > 1``: ``block(x, rate, block_index, key, min_rate)``, ``min_rate`` a
    Python float overriding the block's field, or None) and must derive their drop key as
    ``jax.random.fold_in(key, block_index)`` (``key=None``: no dropping).

    Args:
      block_cls: the block module class.
      x: the stage input.
      name: stage name; submodules are ``f"{name}_block{i}"`` and, scanned, ``f"{name}_rest"``.
      first_kwargs: constructor fields of the first block (e.g. strides 2, new width).
      rest_kwargs: constructor fields of the remaining, identical blocks.
      rates: drop rate of each block of the stage (Python floats).
      first_index: global (network-wide, 0-based) index of the stage's first block.
      key: the model's stochastic-depth key, or None.
      scan_blocks: apply blocks ``1..n-1`` with one ``nn.scan`` (their variables stacked).
      remat: wrap every block in ``nn.remat``.
      drop_rate_scale: None, or a float32 0-d array multiplying every rate (see
        :func:`sdjax.models.base.scale_rate`).
      max_subset_groups: scanned row-subset training without ``drop_rate_scale``: the scanned
        blocks run as up to this many consecutive scans (:func:`subset_groups`) over slices of
        the same stacked variables, each padded to its own largest subset instead of the
        stage's (the blocks must take ``min_rate`` as a 5th call argument and the stage must have no
        mutable collection such as ``batch_stats``). 1: one scan. The result is the same; the
        variables' layout does not change.

    Returns:
      The output of the last block.
    """
    # With groups possible the blocks take min_rate as a 5th call argument (a Python float or
    # None, static under remat: argument 5 counting the module); otherwise the 4-argument call.
    extra = (None,) if max_subset_groups > 1 else ()
    static = {"static_argnums": (5,)} if extra else {}
    cls = nn.remat(block_cls, prevent_cse=not scan_blocks, **static) if remat else block_cls
    x = cls(name=f"{name}_block0", min_rate=_min_rate(rates[:1], drop_rate_scale), **first_kwargs)(
        x, scale_rate(rates[0], drop_rate_scale), first_index, key, *extra
    )
    num_rest = len(rates) - 1
    if num_rest == 0:
        return x
    if scan_blocks:
        scanned = nn.scan(
            functools.partial(_scan_body, extra=extra),
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=num_rest,
        )
        xs = (
            scale_rate(jnp.asarray(rates[1:], jnp.float32), drop_rate_scale),
            jnp.arange(first_index + 1, first_index + 1 + num_rest, dtype=jnp.int32),
        )
        rest = cls(
            name=f"{name}_rest", min_rate=_min_rate(rates[1:], drop_rate_scale), **rest_kwargs
        )
        grouped = (
            max_subset_groups > 1
            and key is not None
            and drop_rate_scale is None
            and not rest.is_initializing()
        )
        groups = subset_groups(rates[1:], max_subset_groups) if grouped else [(0, num_rest)]
        if len(groups) == 1:
            x, _ = scanned(rest, x, xs, key)
            return x
        for lo, hi in groups:
            low = _min_rate(rates[1 + lo : 1 + hi], drop_rate_scale)
            x = _scan_group(rest, x, xs, key, lo, hi, low)
        return x
    for i in range(1, num_rest + 1):
        rate = scale_rate(rates[i], drop_rate_scale)
        block = cls(
            name=f"{name}_block{i}",
            min_rate=_min_rate(rates[i : i + 1], drop_rate_scale),
            **rest_kwargs,
        )
        x = block(x, rate, first_index + i, key, *extra)
    return x


def _scan_group(
    rest: nn.Module, x: Array, xs: tuple[Array, Array], key: Array, lo: int, hi: int, low: float
) -> Array:
    """Scans blocks ``lo..hi-1`` of ``rest`` (its stacked params sliced) with ``min_rate=low``."""

    def take(variables):
        return jax.tree_util.tree_map(lambda v: v[lo:hi], variables)

    body = functools.partial(_scan_body, extra=(low,))
    scanned = nn.scan(body, variable_axes={"params": 0}, in_axes=(0, nn.broadcast), length=hi - lo)
    sliced = nn.map_variables(scanned, "params", trans_in_fn=take)
    x, _ = sliced(rest, x, (xs[0][lo:hi], xs[1][lo:hi]), key)
    return x


def _min_rate(rates: Sequence[float], drop_rate_scale: Array | None) -> float:
    """The static lower bound on the rates of blocks sharing one module (see the module doc).

    ``min(rates)`` without a scale; 0.0 with one (a traced scale may make any rate smaller).
    """
    if drop_rate_scale is not None:
        return 0.0
    return float(min(rates))


_REST = re.compile(r"^(?P<stage>.+)_rest$")
_BLOCK = re.compile(r"^(?P<stage>.+)_block(?P<index>\d+)$")


def _is_mapping(tree: Any) -> bool:
    return isinstance(tree, Mapping)


def scan_to_unrolled(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of a ``scan_blocks=True`` model to the unrolled layout.

    Every ``"<stage>_rest"`` entry (leaves with a leading block axis of size ``n - 1``) becomes
    ``"<stage>_block1"`` ... ``"<stage>_block<n-1>"``. Works on a whole variables dict
    (``{"params": ..., "batch_stats": ...}``) or on one collection. Returns new plain dicts.
    """
    out: dict[str, Any] = {}
    for key, value in variables.items():
        match = _REST.match(key) if isinstance(key, str) else None
        if match and _is_mapping(value):
            num = len(jax.tree_util.tree_leaves(value)[0])
            for i in range(num):
                out[f"{match['stage']}_block{i + 1}"] = jax.tree_util.tree_map(
                    lambda leaf, i=i: leaf[i], _to_dict(value)
                )
        elif _is_mapping(value):
            out[key] = scan_to_unrolled(value)
        else:
            out[key] = value
    return out


def unrolled_to_scan(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of an unrolled model to the ``scan_blocks=True`` layout.

    ``"<stage>_block1"`` ... ``"<stage>_block<n-1>"`` are stacked (leading axis) into
    ``"<stage>_rest"``; ``"<stage>_block0"`` stays. Inverse of :func:`scan_to_unrolled`.
    """
    out: dict[str, Any] = {}
    stacks: dict[str, dict[int, Any]] = {}
    for key, value in variables.items():
        match = _BLOCK.match(key) if isinstance(key, str) else None
        if match and int(match["index"]) >= 1 and _is_mapping(value):
            stacks.setdefault(match["stage"], {})[int(match["index"])] = _to_dict(value)
        elif _is_mapping(value):
            out[key] = unrolled_to_scan(value)
        else:
            out[key] = value
    for stage, blocks in stacks.items():
        if sorted(blocks) != list(range(1, len(blocks) + 1)):
            raise ValueError(f"unrolled_to_scan: blocks of {stage!r} are not 1..n-1: {blocks}.")
        ordered = [blocks[i] for i in range(1, len(blocks) + 1)]
        out[f"{stage}_rest"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ordered)
    return out


def _to_dict(tree: Any) -> Any:
    if _is_mapping(tree):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
