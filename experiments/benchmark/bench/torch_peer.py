"""Times the PyTorch eager peer of one model and base setting (with its ``@RATE``, if any).

The peers are `experiments/reference/torch_models.py`'s, and for the ViTs (``vit_ti16``,
``vit_s16``, ``vit_b16``) `VisionTransformer` below: a plain-PyTorch DeiT/ViT (timm's
``VisionTransformer`` layout; timm itself is not a dependency: installing it would replace the
``bench`` extra's CPU torch). Its drop path is `torch_models.StochasticResidual` on the attention
and on the MLP branch of every block, each with its own draws: ``"row"`` is timm's per-sample
``DropPath``, ``"row_subset"`` DINOv2's subset residual (the branch on ``k = max(1, round((1 -
rate) * N))`` random samples, added back times ``N / k``), ``"batch"`` the paper's skip.

Same synthetic batch as the sdjax row (NCHW for images), same optimizer (SGD, Nesterov
momentum, L2 weight decay), same per-block (a ViT: per-branch) drop rates. The generator is
reseeded with ``seed + 1`` before the steps, so every run draws the same gate sequence. Imports
torch: import this module only when torch is installed (the ``bench`` extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.benchmark.bench import settings, timing
from experiments.reference import torch_models
from sdjax.models import vit

# The ViT peers: sdjax's variants (width, heads), patch 16, 12 blocks, MLP ratio 4.
VIT_PEERS = {f"vit_{suffix}": fields for suffix, fields in vit.VARIANTS.items()}


class _Attention(nn.Module):
    """``proj(attention(qkv(norm1(x))))`` on ``(N, T, D)``: multi-head self-attention, qkv bias."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)  # timm's fused attention
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class _Mlp(nn.Sequential):
    """``fc2(gelu(fc1(norm2(x))))`` with the exact GELU, as timm and sdjax's ViT."""

    def __init__(self, width: int, hidden: int):
        super().__init__(
            nn.LayerNorm(width, eps=1e-6),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Linear(hidden, width),
        )


class VisionTransformer(nn.Module):
    """DeiT/ViT in plain PyTorch, drop path on each branch (timm's ``drop_path1`` / ``2``).

    Patch embedding (a ``patch_size`` convolution with stride ``patch_size``), class token,
    learned position embedding, ``depth`` pre-LayerNorm blocks (attention, then MLP, each a
    `torch_models.StochasticResidual`), final LayerNorm, head on the class token. Input ``(N,
    3, H, W)`` float32 with ``H = W = image_size``; returns logits ``(N, num_classes)``. At 224
    with 1000 classes, ViT-S/16 has 22,050,664 parameters (timm's ``deit_small_patch16_224``).

    Args:
      drop_rates: one rate per residual branch in forward order (block ``i``'s attention at
        ``2i``, its MLP at ``2i + 1``; ``2 * depth`` rates), or None for constant depth.
      drop_mode, scale_by_keep: as in `torch_models.StochasticResidual`.
    """

    def __init__(
        self,
        drop_rates: Sequence[float] | None,
        drop_mode: str,
        scale_by_keep: bool,
        num_classes: int,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_size: int = 384,
        num_heads: int = 6,
        depth: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        rates = list(drop_rates) if drop_rates is not None else [0.0] * (2 * depth)
        if len(rates) != 2 * depth:
            raise ValueError(f"drop_rates: need {2 * depth} (2 per block), got {len(rates)}")
        self.patch_embed = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, hidden_size))
        branches = [
            branch
            for _ in range(depth)
            for branch in (
                _Attention(hidden_size, num_heads),
                _Mlp(hidden_size, int(mlp_ratio * hidden_size)),
            )
        ]
        self.residuals = nn.ModuleList(
            torch_models.StochasticResidual(branch, rate, drop_mode, scale_by_keep)
            for branch, rate in zip(branches, rates, strict=True)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for residual in self.residuals:
            x = residual(x, x)
        return self.head(self.norm(x)[:, 0])


def available() -> tuple[str, ...]:
    """The model names with a PyTorch peer: `torch_models.available` and the ViTs."""
    return (*torch_models.available(), *VIT_PEERS)


def create(
    name: str,
    wl: settings.Workload,
    *,
    drop_rates: Sequence[float] | None,
    drop_mode: str,
    scale_by_keep: bool,
) -> nn.Module:
    """The PyTorch peer of ``name`` for workload ``wl`` (its classes; a ViT: its image size)."""
    if name in VIT_PEERS:
        return VisionTransformer(
            drop_rates,
            drop_mode,
            scale_by_keep,
            wl.num_classes,
            image_size=wl.image_size,
            **VIT_PEERS[name],
        )
    return torch_models.create(
        name,
        drop_rates=drop_rates,
        drop_mode=drop_mode,
        scale_by_keep=scale_by_keep,
        num_classes=wl.num_classes,
    )


def run_torch(
    name: str,
    setting: settings.Setting,
    wl: settings.Workload,
    rates: Sequence[float] | None,
    scale_by_keep: bool,
    args: Any,
) -> dict[str, Any]:
    """Times the PyTorch peer of ``name`` in the base setting of ``setting``.

    Args:
      rates: the sdjax model's per-block drop rates (ignored for ``constant``).
      scale_by_keep: the sdjax model's field.
      args: ``seed``, ``warmup``, ``steps``.

    Returns:
      The row (framework ``"torch"``, the base setting's name with its ``@RATE``,
      `settings.Setting.peer`); batch-mode rows add the fraction of timed steps each block ran.
    """
    inputs, labels = settings.synthetic_batch(wl, args.seed)
    torch.manual_seed(args.seed)
    model = create(
        name,
        wl,
        drop_rates=None if setting.base == "constant" else rates,
        drop_mode="row" if setting.base == "constant" else setting.base,
        scale_by_keep=scale_by_keep,
    )
    step = torch_models.make_train_step(
        model,
        learning_rate=timing.LEARNING_RATE,
        momentum=timing.MOMENTUM,
        weight_decay=timing.WEIGHT_DECAY,
    )
    if inputs.ndim == 4:  # NHWC -> NCHW
        inputs = inputs.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    y = torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(args.seed + 1)  # the same gate sequence in every run
    residuals = [m for m in model.modules() if isinstance(m, torch_models.StochasticResidual)]
    times = []
    loss = None
    for step_index in range(args.warmup + args.steps):
        if step_index == args.warmup:
            for m in residuals:
                m.branches_run = m.branches_seen = 0
        start = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - start)
    row: dict[str, Any] = {
        "framework": "torch",
        "model": name,
        "setting": setting.peer,
        "batch_size": wl.batch_size,
        "image_size": wl.image_size,
        "input_shape": list(wl.input_shape),
        "num_params": sum(p.numel() for p in model.parameters()),
        "scale_by_keep": scale_by_keep,
    }
    row.update(timing.summarize(times[args.warmup :]))
    row["warmup_ms"] = [1e3 * t for t in times[: args.warmup]]
    row["final_loss"] = float(loss)
    seen = sum(m.branches_seen for m in residuals)
    if setting.base == "batch" and seen:
        row["branches_run_fraction"] = sum(m.branches_run for m in residuals) / seen
        # Per droppable block, in forward order: the fraction of timed steps it ran.
        row["branches_run_per_block"] = [
            m.branches_run / m.branches_seen if m.branches_seen else None for m in residuals
        ]
    row["loadavg_after"] = os.getloadavg()
    return row
