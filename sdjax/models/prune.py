"""Pruning residual blocks at inference: evaluate a trained model with some blocks removed.

A removed block's residual branch is not computed and its shortcut is kept: the block's
:class:`sdjax.layers.DropPathResidual` returns ``shortcut`` (the identity, or the projection of
a downsampling ResNet block), exactly what a training step computes when it drops that block.
Networks trained with stochastic depth degrade gracefully under this (Veit et al., 2016;
Huang et al., 2016, section 5; Fan et al., 2020, LayerDrop), which trades accuracy for
inference time.

Blocks are numbered as the model numbers its residual branches everywhere else
(``model.effective_block_rates()``, :func:`sdjax.models.batch_gates`): the global, 0-based
block index in forward order, and for a ViT ``2 * i`` (attention) and ``2 * i + 1`` (MLP) of
transformer block ``i`` -- remove both to remove a whole layer. It works for every registered
family, scanned or not::

    from sdjax.models import prune

    apply = prune.pruned_apply(model, removed_blocks=[53, 52])
    logits = jax.jit(apply)({"params": params, "batch_stats": batch_stats}, images)

``pruned_apply`` returns a pure function of ``(variables, images)``: the model evaluated
(``train=False``) with those blocks removed. The variables may be in either layout: a scanned
model's variables are converted with :func:`sdjax.models.scan_to_unrolled` inside the function
and the model runs unrolled (``scan_blocks=False``, ``remat=False``), so every block index is
static and a removed branch is not even traced. With no block removed the result equals
``model.apply(variables, images, train=False)``.

From a checkpoint written by ``python -m sdjax.main``: rebuild the run with the config it was
written with and take the restored state's ``params`` and ``batch_stats`` (and ``ema_params``
for an EMA run)::

    trainer = sdjax.trainer.build(config, workdir)      # restores the latest checkpoint
    variables = {"params": trainer.state.params, "batch_stats": trainer.state.batch_stats}
    apply = pruned_apply(trainer.model, removed_blocks=removal_order(trainer.model)[:10])

and evaluate as the run does, with the run's own eval step::

    state = trainer.state.replace(apply_fn=apply)
    totals = sdjax.steps.eval_step(state, batch, augment_kwargs=..., num_classes=...)

Or restore with :class:`sdjax.checkpoint.Checkpointer` into a ``jax.eval_shape`` of the train
state (what ``build`` does). The mechanism is public Flax API only
(``flax.linen.intercept_methods``): a model block is a module called as
``block(x, rate, block_index, key)`` (:mod:`sdjax.models.blocks`) whose
``DropPathResidual`` children, in call order, are its residual branches
(``residuals_per_block`` of the block class, 1 unless it says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.layers import DropPathResidual
from sdjax.models.blocks import ResidualBlock
from sdjax.models.stages import scan_to_unrolled

__all__ = ["prunable_blocks", "pruned_apply", "removal_order"]

Array = jax.Array


class _BlockRemover:
    """A method interceptor: removes the residual branches numbered in ``removed``.

    Records the number of every residual branch it sees in ``seen`` (in call order).
    """

    def __init__(self, removed: frozenset[int]):
        self.removed = removed
        self.seen: list[int] = []
        self._blocks: list[list[int]] = []  # [first branch number, branches seen so far]

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, ResidualBlock):
            block_index = args[2] if len(args) > 2 else kwargs["block_index"]
            if isinstance(block_index, jax.core.Tracer):
                raise ValueError(
                    f"prune: block {module.name!r} got a traced block index; pruning needs "
                    "the unrolled layout (scan_blocks=False, remat=False), which pruned_apply "
                    "uses itself."
                )
            per_block = getattr(type(module), "residuals_per_block", 1)
            self._blocks.append([int(block_index) * per_block, 0])
            try:
                return next_fun(*args, **kwargs)
            finally:
                self._blocks.pop()
        if isinstance(module, DropPathResidual) and self._blocks:
            frame = self._blocks[-1]
            number = frame[0] + frame[1]
            frame[1] += 1
            self.seen.append(number)
            if number in self.removed:
                return args[1] if len(args) > 1 else kwargs["shortcut"]
        return next_fun(*args, **kwargs)


def _check_numbers(model: nn.Module, removed_blocks: Iterable[int]) -> frozenset[int]:
    blocks = list(removed_blocks)
    bad = [
        b
        for b in blocks
        if isinstance(b, bool)
        or not isinstance(b, (int, np.integer))
        or not 0 <= b < model.num_blocks
    ]
    if bad:
        raise ValueError(
            f"prune: removed_blocks must be block numbers in [0, {model.num_blocks}) "
            f"({type(model).__name__}.num_blocks), got {bad}."
        )
    return frozenset(int(b) for b in blocks)


def _unrolled(model: nn.Module) -> nn.Module:
    return model.clone(scan_blocks=False, remat=False)


def pruned_apply(
    model: nn.Module, removed_blocks: Iterable[int] = ()
) -> Callable[[Mapping[str, Any], Array], Array]:
    """The eval function of ``model`` with the residual branches ``removed_blocks`` removed.

    Args:
      model: an sdjax model (:func:`sdjax.models.create`), scanned or unrolled.
      removed_blocks: block numbers in ``[0, model.num_blocks)`` (see the module docstring);
        each must have a residual branch (:func:`prunable_blocks`). Empty: normal evaluation.

    Returns:
      ``apply(variables, images, train=False) -> logits``: pure and jittable, with the call
      signature of ``model.apply`` in evaluation (so it can replace a train state's
      ``apply_fn`` for :func:`sdjax.steps.eval_step`); ``variables`` is
      ``{"params": ..., ["batch_stats": ...]}`` of ``model`` (its own layout), ``images`` float
      ``(N, H, W, C)``; ``logits`` float32 ``(N, num_classes)``, deterministic (eval mode:
      BatchNorm running averages, the eval scaling of ``scale_by_keep=False`` on every kept
      branch).

    Raises:
      ValueError: a number out of range (at once), or, when ``apply`` is traced, a number whose
        block has no residual branch (e.g. an EfficientNet block without identity shortcut).
    """
    removed = _check_numbers(model, removed_blocks)
    unrolled = _unrolled(model)
    convert = bool(model.scan_blocks)

    def apply(variables: Mapping[str, Any], images: Array, train: bool = False) -> Array:
        if train:
            raise ValueError("prune: a pruned model is for evaluation only (train=False).")
        variables = scan_to_unrolled(variables) if convert else variables
        remover = _BlockRemover(removed)
        with nn.intercept_methods(remover):
            logits = unrolled.apply(variables, images, train=False)
        missing = sorted(removed - set(remover.seen))
        if missing:
            raise ValueError(
                f"prune: block(s) {missing} of {type(model).__name__} have no residual branch "
                f"and cannot be removed; prunable blocks: {sorted(set(remover.seen))}."
            )
        return logits

    return apply


def prunable_blocks(model: nn.Module, image_shape: Sequence[int]) -> tuple[int, ...]:
    """The numbers of the blocks that have a residual branch (that can be removed).

    Traced abstractly (``jax.eval_shape`` of ``init``: nothing is computed). Every block of
    the ResNets, ViTs and ConvNeXts; EfficientNet's blocks with an identity shortcut.

    Args:
      model: an sdjax model.
      image_shape: one image's shape ``(H, W, C)``.
    """
    remover = _BlockRemover(frozenset())

    def init():
        with nn.intercept_methods(remover):
            return _unrolled(model).init(
                jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)
            )

    jax.eval_shape(init)
    return tuple(sorted(set(remover.seen)))


def removal_order(
    model: nn.Module, blocks: Sequence[int] | None = None, *, seed: int | None = None
) -> list[int]:
    """An order in which to remove blocks: lowest survival first, or a random one.

    Args:
      model: an sdjax model (its ``effective_block_rates()`` give the survival).
      blocks: the candidates (default: every block number, ``range(model.num_blocks)``; pass
        :func:`prunable_blocks` for EfficientNet).
      seed: None: by decreasing drop rate (lowest survival probability first), ties broken by
        the later block first; an int: a random permutation (``numpy.random.default_rng``).

    Returns:
      The block numbers in removal order; remove the first ``n`` to remove ``n`` blocks.
    """
    blocks = list(range(model.num_blocks) if blocks is None else blocks)
    if seed is not None:
        return [int(b) for b in np.random.default_rng(seed).permutation(blocks)]
    rates = model.effective_block_rates()
    return sorted(blocks, key=lambda b: (-rates[b], -b))
