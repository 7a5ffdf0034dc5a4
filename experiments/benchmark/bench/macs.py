"""Analytic compute per residual block, and the fraction of it a stochastic-depth step keeps.

Multiply-accumulates (MACs) per example, counted from the architecture at the benchmark's input
size: every convolution and dense layer of a block's residual branch (`block_compute`), and of
the rest of the network (stem, head, blocks that cannot be dropped). The CIFAR ResNets' and
EfficientNets' shapes come from the models themselves (``CifarResNet.widths`` /
``blocks_per_stage``, ``EfficientNet.stages()``); a ViT's residual branches (attention and MLP
of each block, in the model's branch order) from ``ViT.hidden_size`` / ``patch_size`` /
``mlp_ratio``, counting the attention's two token-by-token products.

* ideal kept fraction (`ideal_ratios`): ``sum_l w_l (1 - r_l) / sum_l w_l`` over the blocks
  (``w_l``: MACs of block ``l``'s branch, ``r_l``: its drop rate); the step version adds the
  never-dropped MACs to both sums (backward cost taken proportional to forward cost; elementwise
  work and the optimizer update ignored).
* realized kept fraction (`kept_block_compute`): the same weighting of the gates a step drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments.benchmark.bench import settings, transformer
from sdjax import models
from sdjax.models import efficientnet, vit

BlockCompute = tuple[list[float], list[bool], float]
"""(MACs per block, whether the block can be dropped, MACs of everything else), per example."""


def cifar_resnet_macs(model: Any, image_size: int) -> tuple[list[float], float]:
    """MACs per residual block of a `CifarResNet`, and of its stem + classifier, per image."""
    widths = tuple(model.widths)
    block_macs = []
    size = image_size
    in_channels = widths[0]
    for stage, channels in enumerate(widths):
        for index in range(model.blocks_per_stage):
            if stage > 0 and index == 0:
                size = -(-size // 2)
            first = size * size * 9 * in_channels * channels
            second = size * size * 9 * channels * channels
            block_macs.append(float(first + second))
            in_channels = channels
    other = image_size * image_size * 9 * model.input_channels * widths[0]
    other += widths[-1] * model.num_classes
    return block_macs, float(other)


def efficientnet_macs(model: Any, image_size: int) -> BlockCompute:
    """MACs per MBConv block of an `EfficientNet`, whether it has an identity skip, and the rest."""
    stages = model.stages()
    size = -(-image_size // 2)
    other = size * size * 9 * model.input_channels * stages[0].in_filters  # stem
    block_macs, has_skip = [], []
    in_channels = stages[0].in_filters
    for spec in stages:
        for index in range(spec.repeats):
            stride = spec.strides if index == 0 else 1
            hidden = in_channels * spec.expand_ratio
            macs = size * size * in_channels * hidden if spec.expand_ratio != 1 else 0
            size = -(-size // stride)
            squeeze = max(1, int(in_channels * efficientnet.SE_RATIO))
            macs += size * size * spec.kernel_size**2 * hidden  # depthwise
            macs += 2 * hidden * squeeze  # squeeze-excite
            macs += size * size * hidden * spec.out_filters  # projection
            block_macs.append(float(macs))
            has_skip.append(stride == 1 and in_channels == spec.out_filters)
            in_channels = spec.out_filters
    head = efficientnet.round_filters(efficientnet.HEAD_FILTERS, model.width_coefficient)
    other += size * size * in_channels * head + head * model.num_classes
    return block_macs, has_skip, float(other)


def transformer_macs(tokens: int, width: int) -> BlockCompute:
    """MACs per MLP block of the transformer stack (two dense layers) and of its head."""
    stack = transformer.TransformerMLPStack(
        num_classes=settings.NUM_CLASSES, **settings.TRANSFORMER_FIELDS
    )
    block = 2.0 * tokens * width * stack.hidden_ratio * width
    return [block] * stack.num_blocks, [True] * stack.num_blocks, float(width * stack.num_classes)


def vit_macs(model: Any, image_size: int) -> BlockCompute:
    """MACs per residual branch of a `ViT` (attention, MLP, ... per block) and of its patch
    embedding + head, per image."""
    width, patches = model.hidden_size, (image_size // model.patch_size) ** 2
    tokens = patches + 1  # the class token
    attention = tokens * 4 * width * width + 2 * tokens * tokens * width  # qkv, proj; QK^T, AV
    mlp = 2 * tokens * width * int(model.mlp_ratio * width)
    block_macs = [float(attention), float(mlp)] * model.num_layers
    other = patches * model.patch_size**2 * model.input_channels * width
    other += width * model.num_classes
    return block_macs, [True] * len(block_macs), float(other)


def _create(name: str) -> Any:
    return models.create(name, num_classes=settings.num_classes(name))


def block_compute(name: str, image_size: int) -> BlockCompute | None:
    """`BlockCompute` of model ``name`` at ``image_size`` (the token count for the transformer
    stack), or None for an architecture not counted here (the ImageNet ResNets)."""
    if name == transformer.NAME:
        return transformer_macs(image_size, settings.TRANSFORMER_INPUT[1])
    if name.startswith("cifar_resnet"):
        block_macs, other = cifar_resnet_macs(_create(name), image_size)
        return block_macs, [True] * len(block_macs), other
    if name.startswith("efficientnet"):
        return efficientnet_macs(_create(name), image_size)
    if settings.is_vit(name):
        return vit_macs(_create(name), image_size)
    return None


def block_drop_rates(model: Any) -> list[float]:
    """The model's per-block drop rates (its schedule at its final rate), in forward order.

    A ViT's are per residual branch (``effective_block_rates``: block ``i``'s rate for its
    attention and its MLP branch), as `vit_macs` and the PyTorch peer count them.
    """
    if isinstance(model, vit.ViT):
        return [float(r) for r in model.effective_block_rates()]
    return [float(r) for r in model.block_rates(model.num_blocks)]


def ideal_ratios(name: str, image_size: int, rates: Sequence[float]) -> dict[str, float] | None:
    """Expected fraction of compute kept when block ``l`` is dropped with rate ``rates[l]``.

    Returns:
      ``{"ideal_blocks", "ideal_step", "unweighted_blocks", "macs_per_image"}`` (see the module
      docstring; ``unweighted_blocks`` counts every block as 1), or None when the architecture
      is not counted or ``rates`` does not have one rate per block.
    """
    compute = block_compute(name, image_size)
    if compute is None or len(compute[0]) != len(rates):
        return None
    block_macs, droppable, other = compute
    kept = sum(
        w * (1.0 - r if d else 1.0) for w, r, d in zip(block_macs, rates, droppable, strict=True)
    )
    total = sum(block_macs)
    return {
        "ideal_blocks": kept / total,
        "ideal_step": (kept + other) / (total + other),
        "unweighted_blocks": 1.0
        - sum(r for r, d in zip(rates, droppable, strict=True) if d) / len(rates),
        "macs_per_image": total + other,
    }


def kept_block_compute(name: str, image_size: int, kept: Sequence[float]) -> float | None:
    """MAC-weighted fraction of the block compute kept, for per-block kept fractions ``kept``
    (1/0 gates of one step, or the fraction of steps each block ran); blocks that cannot be
    dropped count as kept. None when ``kept`` does not have one value per block."""
    compute = block_compute(name, image_size)
    if compute is None or len(compute[0]) != len(kept):
        return None
    block_macs, droppable, _ = compute
    return sum(
        w * (k if d else 1.0) for w, k, d in zip(block_macs, kept, droppable, strict=True)
    ) / sum(block_macs)


def torch_kept_block_compute(name: str, image_size: int, row: dict | None) -> float | None:
    """`kept_block_compute` of a PyTorch batch-mode row (its run fraction per droppable block)."""
    per_droppable = (row or {}).get("branches_run_per_block")
    compute = block_compute(name, image_size)
    if not per_droppable or compute is None or sum(compute[1]) != len(per_droppable):
        return None
    it = iter(per_droppable)
    return kept_block_compute(name, image_size, [next(it) if d else 1.0 for d in compute[1]])
