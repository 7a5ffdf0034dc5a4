"""Times the PyTorch eager peer (`experiments/reference/torch_models.py`) of one model and base setting.

Same synthetic batch as the sdjax row (NCHW for images), same optimizer (SGD, Nesterov
momentum, L2 weight decay), same per-block drop rates. The generator is reseeded with
``seed + 1`` before the steps, so every run draws the same gate sequence. Imports torch: import
this module only when torch is installed (the ``bench`` extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from experiments.benchmark.bench import settings, timing
from experiments.reference import torch_models


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
      The row (framework ``"torch"``, the base setting's name); batch-mode rows add the
      fraction of timed steps each block ran.
    """
    inputs, labels = settings.synthetic_batch(wl, args.seed)
    torch.manual_seed(args.seed)
    model = torch_models.create(
        name,
        drop_rates=None if setting.base == "constant" else rates,
        drop_mode="row" if setting.base == "constant" else setting.base,
        scale_by_keep=scale_by_keep,
        num_classes=settings.NUM_CLASSES,
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
        "setting": setting.base,
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
