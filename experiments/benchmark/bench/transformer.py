"""The transformer MLP stack workload: pre-norm MLP blocks, each a `DropPathResidual`.

A stack of ``num_blocks`` pre-norm transformer MLP blocks on ``(N, tokens, width)`` inputs::

    x = x + drop_path(MLP(LayerNorm(x)))       # MLP: Dense(hidden) -> GELU -> Dense(width)

followed by a LayerNorm, a mean over tokens and a linear classifier (float32 logits
``(N, num_classes)``). Each residual goes through `sdjax.layers.DropPathResidual` with the
model's ``drop_mode`` (``"row"``, ``"batch"`` or ``"row_subset"``, where the layer supports it),
so the benchmark times the layer itself on the setting that DINOv2's row-subset residual was
written for (12 blocks, width 384, hidden 4 x width, uniform drop rate 0.4).

The model follows the sdjax models' conventions: ``train`` flag, ``"dropout"`` rng collection,
block ``b``'s key is ``fold_in(make_rng("dropout"), b)`` (so `sdjax.models.batch_gates` gives
its batch-mode gates), and `block_rates` / `effective_block_rates`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import schedules
from sdjax.layers import DropPathResidual

NAME = "transformer_mlp_stack"


class MLPBranch(nn.Module):
    """``Dense(width) . gelu . Dense(hidden) . LayerNorm``: the residual branch of one block."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        y = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(y))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class TransformerMLPStack(nn.Module):
    """Pre-norm transformer MLP blocks with stochastic depth on every residual.

    Attributes:
      num_blocks: number of MLP blocks (12).
      hidden_ratio: MLP hidden width over the model width (4).
      num_classes: logits of the classifier (10).
      final_drop_rate: the schedule's rate (0.4); ``drop_schedule`` as in `sdjax.schedules`
        (``"uniform"``: every block drops with ``final_drop_rate``).
      drop_mode: the `DropPathResidual` mode of every block.
      drop_shards: ``"row_subset"``: the number of devices the batch is sharded over (each
        draws its own subset; `DropPathResidual`'s ``num_shards``; 1).
      scale_by_keep: as in `DropPathResidual`.
      dtype: compute dtype (parameters and logits stay float32).

    Call: ``apply(variables, x, train=..., rngs={"dropout": key})`` with ``x`` float
    ``(N, tokens, width)``; the width is the input's last axis.
    """

    num_blocks: int = 12
    hidden_ratio: int = 4
    num_classes: int = 10
    final_drop_rate: float = 0.4
    drop_schedule: str = "uniform"
    drop_mode: str = "row"
    drop_shards: int = 1
    scale_by_keep: bool = True
    dtype: Any = jnp.float32

    def block_rates(self, num_blocks: int) -> tuple[float, ...]:
        """The per-block drop rates of ``num_blocks`` blocks, in forward order."""
        return tuple(schedules.get(self.drop_schedule)(num_blocks, self.final_drop_rate))

    def effective_block_rates(self) -> tuple[float, ...]:
        """The rate each block trains with (every block can be dropped)."""
        return self.block_rates(self.num_blocks)

    @nn.compact
    def __call__(self, x, train: bool = False):
        rates = self.effective_block_rates()
        key = self.make_rng("dropout") if train and max(rates) > 0 else None
        x = x.astype(self.dtype)
        for index, rate in enumerate(rates):
            branch = MLPBranch(self.hidden_ratio * x.shape[-1], self.dtype)
            x = DropPathResidual(
                branch,
                rate=rate,
                mode=self.drop_mode,
                scale_by_keep=self.scale_by_keep,
                num_shards=self.drop_shards,
                name=f"block{index}",
            )(
                x,
                x,
                deterministic=key is None,
                rng=None if key is None else jax.random.fold_in(key, index),
            )
        x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=1))
        return x.astype(jnp.float32)
