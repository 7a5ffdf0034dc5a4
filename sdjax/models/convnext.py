"""ConvNeXt (Liu et al., 2022) with drop path per block, in timm's ``convnext.py`` layout.

* stem: 4x4 convolution with stride 4 (and a bias), LayerNorm;
* four stages of ``depths`` blocks with ``widths`` channels; before stages 2-4 a downsampling
  layer (LayerNorm, 2x2 convolution with stride 2 and a bias), outside any residual block;
* block (an inverted bottleneck)::

      x = x + drop_path(gamma * pw2(gelu(pw1(norm(dwconv7x7(x))))))

  with a depthwise 7x7 convolution (bias), LayerNorm over channels, ``pw1`` a dense layer to
  ``4 * C`` channels, exact GELU, ``pw2`` back to ``C``, and LayerScale ``gamma`` initialised to
  ``layer_scale_init = 1e-6``;
* global average pooling, LayerNorm, dense head.

Stochastic depth as in timm: block ``b`` of all ``L = sum(depths)`` blocks, counted in forward
order over the stages, gets ``linspace(0, final_drop_rate, L)[b]`` with
``drop_schedule="linear"`` (see :mod:`sdjax.models.ln_base`), per sample (``"row"``) with
``scale_by_keep=True`` by default; ``final_drop_rate`` defaults to the paper's ImageNet-1k rate
of each registered variant (0.1, 0.4, 0.5 for T, S, B). Each stage is scanned by default (``"stage<s>_block0"`` and
``"stage<s>_rest"``, :func:`sdjax.models.stages.apply_stage`). With 224 x 224 x 3 inputs and
1000 classes ConvNeXt-T has 28,589,128 parameters, ConvNeXt-S 50,223,688 and ConvNeXt-B
88,591,464, as in timm.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.base import _check_positive_int, check_drop_rate_scale, check_input, model_key
from sdjax.models.blocks import ModuleDef, ResidualBlock
from sdjax.models.ln_base import LayerNormNet, gelu, layer_scale
from sdjax.models.stages import apply_stage

__all__ = ["VARIANTS", "ConvNeXt", "ConvNeXtBlock"]

#: name suffix -> depths, widths and the paper's ImageNet-1k drop path rate (Liu et al. 2022,
#: table 9: 0.1 / 0.4 / 0.5 for T / S / B).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768), final_drop_rate=0.1),
    "small": dict(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768), final_drop_rate=0.4),
    "base": dict(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024), final_drop_rate=0.5),
}


class _ConvNeXtBranch(nn.Module):
    """``gamma * pw2(gelu(pw1(norm(dwconv7x7(x)))))``, ``(N, H, W, C)`` -> same shape."""

    conv: ModuleDef
    dense: ModuleDef
    norm: ModuleDef
    layer_scale_init: float | None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        y = self.conv(features, (7, 7), feature_group_count=features, name="dw_conv")(x)
        y = self.norm(name="norm")(y)
        y = gelu(self.dense(4 * features, name="pw1")(y))
        y = self.dense(features, name="pw2")(y)
        return layer_scale(self, y, self.layer_scale_init)


class ConvNeXtBlock(ResidualBlock):
    """A ConvNeXt block: ``x + drop_path(branch(x))`` (identity shortcut, stride 1).

    Called as ``block(x, rate, block_index, key, min_rate)`` (see :mod:`sdjax.models.blocks`).

    Attributes:
      dense: the ``nn.Dense`` factory of the pointwise layers.
      layer_scale_init: LayerScale initial value (1e-6), or None.
    """

    dense: ModuleDef = nn.Dense
    layer_scale_init: float | None = 1e-6

    @nn.compact
    def __call__(self, x, rate, block_index, key, min_rate=None):
        branch = functools.partial(
            _ConvNeXtBranch, self.conv, self.dense, self.norm, self.layer_scale_init
        )
        return self.residual(branch, x, x, rate, block_index, key, min_rate)


class ConvNeXt(LayerNormNet):
    """ConvNeXt (ConvNeXt-T by default; the registry sets the variants).

    Attributes:
      depths: blocks per stage ((3, 3, 9, 3)).
      widths: channels per stage ((96, 192, 384, 768)); as many as ``depths``.
      layer_scale_init: LayerScale initial value (1e-6 here; None disables it).
      The other LayerNorm-family fields and defaults are those of
      :class:`sdjax.models.ln_base.LayerNormNet`; the shared fields those of
      :class:`sdjax.models.base.StochasticDepthModel`.

    Call: ``model.apply(variables, x, train=..., drop_rate_scale=None, rngs={"dropout": key})``
    with ``x`` float ``(N, H, W, input_channels)``, ``H, W >= 32``; returns float32 logits
    ``(N, num_classes)``.
    """

    depths: tuple[int, ...] = (3, 3, 9, 3)
    widths: tuple[int, ...] = (96, 192, 384, 768)
    layer_scale_init: float | None = 1e-6

    def __post_init__(self):
        try:
            depths, widths = tuple(self.depths), tuple(self.widths)
            if not depths or len(depths) != len(widths):
                raise ValueError(
                    f"depths={self.depths!r} and widths={self.widths!r} must be non-empty "
                    "sequences of the same length."
                )
            for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
                _check_positive_int(depth, f"depths[{i}]")
                _check_positive_int(width, f"widths[{i}]")
        except ValueError as err:
            raise ValueError(f"ConvNeXt: {err}") from None
        super().__post_init__()

    @property
    def num_layers(self) -> int:
        """All blocks, ``sum(depths)`` (the schedule runs over them in forward order)."""
        return sum(self.depths)

    @property
    def num_blocks(self) -> int:
        """The number of residual blocks ``L = sum(depths)``."""
        return self.num_layers

    @nn.compact
    def __call__(self, x, train: bool = False, drop_rate_scale: Any = None):
        """Returns float32 logits ``(N, num_classes)`` for float images ``(N, H, W, C)``.

        ``drop_rate_scale``: None, or a float32 scalar (may be traced) multiplying every block's
        drop rate; see :func:`sdjax.models.base.scale_rate`.
        """
        min_size = 4 * 2 ** (len(self.depths) - 1)
        x = check_input(x, model="ConvNeXt", input_channels=self.input_channels, min_size=min_size)
        scale = check_drop_rate_scale(drop_rate_scale, "ConvNeXt")
        rates = self.layer_rates()
        key = model_key(self, train and max(rates) > 0)
        defs = self.block_defs(train)
        conv, norm = defs["conv"], defs["norm"]
        x = conv(self.widths[0], (4, 4), 4, padding="VALID", name="stem_conv")(x)
        x = norm(name="stem_norm")(x)
        first_index = 0
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True)):
            if stage > 0:
                x = norm(name=f"downsample{stage + 1}_norm")(x)
                x = conv(width, (2, 2), 2, padding="VALID", name=f"downsample{stage + 1}_conv")(x)
            block = dict(
                features=width,
                layer_scale_init=self.layer_scale_init,
                conv=conv,
                dense=defs["dense"],
                norm=norm,
                drop_path=defs["drop_path"],
            )
            x = apply_stage(
                ConvNeXtBlock,
                x,
                name=f"stage{stage + 1}",
                first_kwargs=block,
                rest_kwargs=block,
                rates=rates[first_index : first_index + depth],
                first_index=first_index,
                key=key,
                scan_blocks=self.scan_blocks,
                remat=self.remat,
                drop_rate_scale=scale,
                max_subset_groups=self.stage_subset_groups(),
            )
            first_index += depth
        x = norm(name="head_norm")(jnp.mean(x, axis=(1, 2)))
        x = defs["dense"](self.num_classes, name="head")(x)
        return x.astype(jnp.float32)
