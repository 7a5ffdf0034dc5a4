"""Vision Transformers in the DeiT/ViT layout with drop path on each residual branch.

Follows timm's ``vision_transformer.py`` (the layout of ``deit_*_patch16_224`` and
``vit_*_patch16_224``):

* patch embedding: a ``patch_size x patch_size`` convolution with stride ``patch_size`` and a
  bias (``N x H x W x C`` -> ``N x (H/p * W/p) x D``), a learned class token prepended and a
  learned position embedding (one per token, class token included) added;
* ``num_layers`` pre-LayerNorm transformer blocks, each two residual branches::

      x = x + drop_path1(ls1(attn(norm1(x))))      # multi-head self-attention, qkv with bias
      x = x + drop_path2(ls2(mlp(norm2(x))))       # Dense(mlp_ratio * D), exact GELU, Dense(D)

  ``ls1`` / ``ls2`` are the optional LayerScale (``layer_scale_init``; off by default, as in
  DeiT);
* a final LayerNorm, the class token's features, a dense head.

Stochastic depth as in timm: the attention and the MLP branch of block ``i`` are dropped
independently (timm's ``drop_path1`` / ``drop_path2``), both at block ``i``'s rate; the rates
are ``linspace(0, final_drop_rate, num_layers)`` for ``drop_schedule="linear"`` (see
:mod:`sdjax.models.ln_base`). The residual branches are numbered ``2 * i`` (attention) and
``2 * i + 1`` (MLP), ``num_blocks = 2 * num_layers``: branch ``b`` draws its gate (or its
subset) from ``fold_in(key, b)``, :meth:`ViT.effective_block_rates` and
:func:`sdjax.models.batch_gates` list the branches in that order, and
:mod:`sdjax.models.prune` removes branches by that number.

The blocks are one scanned stage by default (``"encoder_block0"`` and ``"encoder_rest"``,
:func:`sdjax.models.stages.apply_stage`): the per-block rates and indices are carried through
the scan. With the default ``224 x 224 x 3`` input and 1000 classes, ViT-Ti/16 has 5,717,416
parameters, ViT-S/16 (DeiT-S) 22,050,664 and ViT-B/16 86,567,656, as in timm.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.base import _check_positive_int, check_drop_rate_scale, check_input, model_key
from sdjax.models.blocks import ModuleDef, ResidualBlock
from sdjax.models.ln_base import LayerNormNet, gelu, layer_scale, trunc_normal
from sdjax.models.stages import apply_stage

__all__ = ["VARIANTS", "ViT", "ViTBlock"]

#: name suffix -> (hidden_size, num_heads); all have patch 16, 12 layers and MLP ratio 4.
VARIANTS: dict[str, dict[str, int]] = {
    "ti16": dict(hidden_size=192, num_heads=3),
    "s16": dict(hidden_size=384, num_heads=6),
    "b16": dict(hidden_size=768, num_heads=12),
}

# timm initialises the patch embedding like a default torch conv (fan-in uniform, a = sqrt(5)).
_patch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class _AttentionBranch(nn.Module):
    """``ls1(attn(norm1(x)))``: pre-LayerNorm multi-head self-attention, ``(N, T, D)``."""

    num_heads: int
    dense: ModuleDef
    norm: ModuleDef
    layer_scale_init: float | None

    @nn.compact
    def __call__(self, x):
        batch, tokens, features = x.shape
        head_dim = features // self.num_heads
        y = self.norm(name="norm")(x)
        qkv = self.dense(3 * features, name="qkv")(y)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * jnp.asarray(head_dim**-0.5, q.dtype), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(batch, tokens, features)
        y = self.dense(features, name="proj")(y)
        return layer_scale(self, y, self.layer_scale_init)


class _MlpBranch(nn.Module):
    """``ls2(fc2(gelu(fc1(norm2(x)))))``, ``(N, T, D)``."""

    hidden: int
    dense: ModuleDef
    norm: ModuleDef
    layer_scale_init: float | None

    @nn.compact
    def __call__(self, x):
        y = self.norm(name="norm")(x)
        y = gelu(self.dense(self.hidden, name="fc1")(y))
        y = self.dense(x.shape[-1], name="fc2")(y)
        return layer_scale(self, y, self.layer_scale_init)


class ViTBlock(ResidualBlock):
    """A pre-LayerNorm transformer block: two residual branches with independent drop paths.

    Called as ``block(x, rate, block_index, key, min_rate)`` (see :mod:`sdjax.models.blocks`) with ``x``
    of shape ``(N, T, features)``: both branches use ``rate``; the attention branch draws from
    ``fold_in(key, 2 * block_index)``, the MLP branch from ``fold_in(key, 2 * block_index + 1)``
    (children ``"attn_residual"`` / ``"mlp_residual"``, each a
    :class:`sdjax.layers.DropPathResidual`). ``conv`` is the ``nn.Dense`` factory here (a
    transformer block has no convolution).

    Attributes:
      num_heads: attention heads (``features`` must be divisible by it).
      mlp_ratio: the MLP's hidden width is ``int(mlp_ratio * features)``.
      layer_scale_init: LayerScale initial value, or None.
    """

    #: Residual branches per block (the blocks' branch numbering, see :mod:`sdjax.models.prune`).
    residuals_per_block: ClassVar[int] = 2

    num_heads: int = 6
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = None

    @nn.compact
    def __call__(self, x, rate, block_index, key, min_rate=None):
        min_rate = self.min_rate if min_rate is None else min_rate
        branches = (
            functools.partial(
                _AttentionBranch, self.num_heads, self.conv, self.norm, self.layer_scale_init
            ),
            functools.partial(
                _MlpBranch,
                int(self.mlp_ratio * self.features),
                self.conv,
                self.norm,
                self.layer_scale_init,
            ),
        )
        for j, (name, branch) in enumerate(zip(("attn", "mlp"), branches, strict=True)):
            residual = self.drop_path(branch, rate=rate, min_rate=min_rate, name=f"{name}_residual")
            x = residual(
                x,
                x,
                deterministic=key is None,
                rng=None if key is None else jax.random.fold_in(key, 2 * block_index + j),
            )
        return x


class ViT(LayerNormNet):
    """Vision Transformer (DeiT/ViT layout; ViT-S/16 by default, the registry sets variants).

    Attributes:
      patch_size: side of the square patches (16); the image sides must be multiples of it.
      hidden_size: token width ``D`` (384).
      num_layers: transformer blocks (12).
      num_heads: attention heads (6); ``hidden_size`` must be divisible by it.
      mlp_ratio: MLP hidden width over ``hidden_size`` (4.0).
      The LayerNorm-family fields (``layer_scale_init``, ``layer_norm_epsilon``,
      ``subset_scan_groups``) and defaults are
      those of :class:`sdjax.models.ln_base.LayerNormNet`; the shared fields those of
      :class:`sdjax.models.base.StochasticDepthModel`.

    The position embedding has one entry per patch of the image size seen at ``init`` (plus the
    class token); apply with images of that size.

    Call: ``model.apply(variables, x, train=..., drop_rate_scale=None, rngs={"dropout": key})``
    with ``x`` float ``(N, H, W, input_channels)``; returns float32 logits ``(N, num_classes)``.
    In training with a positive drop rate one key is drawn from the ``"dropout"`` collection.
    """

    patch_size: int = 16
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self):
        try:
            for field in ("patch_size", "hidden_size", "num_layers", "num_heads"):
                _check_positive_int(getattr(self, field), field)
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must be divisible by "
                    f"num_heads={self.num_heads}."
                )
            if isinstance(self.mlp_ratio, bool) or not (
                isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0
            ):
                raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}.")
        except ValueError as err:
            raise ValueError(f"ViT: {err}") from None
        super().__post_init__()

    @property
    def num_blocks(self) -> int:
        """The number of residual branches, ``2 * num_layers`` (attention, MLP per block)."""
        return 2 * self.num_layers

    def effective_block_rates(self) -> tuple[float, ...]:
        """Each residual branch's rate, in branch order (block ``i``'s rate at ``2i``, ``2i+1``)."""
        return tuple(rate for rate in self.layer_rates() for _ in range(2))

    @nn.compact
    def __call__(self, x, train: bool = False, drop_rate_scale: Any = None):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``.

        ``drop_rate_scale``: None, or a float32 scalar (may be traced) multiplying every
        branch's drop rate; see :func:`sdjax.models.base.scale_rate`.
        """
        p = self.patch_size
        x = check_input(x, model="ViT", input_channels=self.input_channels, min_size=p)
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"ViT: image sides must be multiples of patch_size={p}, got "
                f"{x.shape[1]}x{x.shape[2]}."
            )
        scale = check_drop_rate_scale(drop_rate_scale, "ViT")
        rates = self.layer_rates()
        key = model_key(self, train and max(rates) > 0)
        defs = self.block_defs(train)
        x = defs["conv"](
            self.hidden_size,
            (p, p),
            p,
            padding="VALID",
            kernel_init=_patch_init,
            name="patch_embed",
        )(x)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.hidden_size)
        cls = self.param(
            "cls_token", nn.initializers.normal(1e-6), (1, 1, self.hidden_size), jnp.float32
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, x.shape[-1])), x], 1)
        pos = self.param("pos_embed", trunc_normal, (1, x.shape[1], self.hidden_size), jnp.float32)
        x = (x + pos.astype(x.dtype)).astype(self.dtype)
        block = dict(
            features=self.hidden_size,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            layer_scale_init=self.layer_scale_init,
            conv=defs["dense"],
            norm=defs["norm"],
            drop_path=defs["drop_path"],
        )
        x = apply_stage(
            ViTBlock,
            x,
            name="encoder",
            first_kwargs=block,
            rest_kwargs=block,
            rates=rates,
            first_index=0,
            key=key,
            scan_blocks=self.scan_blocks,
            remat=self.remat,
            drop_rate_scale=scale,
            max_subset_groups=self.stage_subset_groups(),
        )
        x = defs["norm"](name="encoder_norm")(x)[:, 0]
        x = defs["dense"](self.num_classes, name="head")(x)
        return x.astype(jnp.float32)
