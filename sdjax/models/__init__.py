"""sdjax models: the paper's CIFAR ResNets, ImageNet ResNets and EfficientNet B0-B7.

Every model is a Flax Linen module with stochastic depth wired in (see
:class:`sdjax.models.base.StochasticDepthModel` for the fields they share)::

    import jax, jax.numpy as jnp
    import sdjax.models

    model = sdjax.models.create("cifar_resnet110")            # the paper's defaults
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits, updates = model.apply(variables, images, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])

``create`` gives the fast path with no switch: each stage's identical blocks are scanned
(``scan_blocks=True``; :func:`scan_to_unrolled` / :func:`unrolled_to_scan` convert variables to
and from the one-submodule-per-block layout) and convolutions use ``conv_impl="auto"``.
``model.apply(..., drop_rate_scale=s)`` multiplies every block's drop rate by ``s`` (e.g. a
warm-up); :func:`batch_gates` with the same ``s`` gives the gates such a step draws.

Files: ``base.py`` (shared fields, checks, rates), ``blocks.py`` (the block contract and its
residual helper), ``conv_norm.py`` (convolution, shortcut), ``stages.py`` (scan/unrolled stages,
layout converters), ``gates.py`` (:func:`batch_gates`), one file per family.

Registered names (:func:`names`): ``cifar_resnet{20,32,44,56,110,152,1202}``,
``resnet{18,34,50,101,152}``, ``efficientnet_b{0..7}``, ``vit_{ti16,s16,b16}`` (DeiT/ViT,
``vit.py``), ``convnext_{tiny,small,base}`` (``convnext.py``); the LayerNorm families share
``ln_base.py``, and ``prune.py`` evaluates any model with residual blocks removed. This package
imports neither TensorFlow nor any data or training code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from sdjax.models.base import dataclass_fields
from sdjax.models.cifar_resnet import DEPTHS as CIFAR_DEPTHS
from sdjax.models.cifar_resnet import CifarResNet
from sdjax.models.convnext import VARIANTS as CONVNEXT_VARIANTS
from sdjax.models.convnext import ConvNeXt
from sdjax.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from sdjax.models.efficientnet import EfficientNet
from sdjax.models.gates import batch_gates
from sdjax.models.resnet import STAGE_SIZES as RESNET_DEPTHS
from sdjax.models.resnet import ResNet
from sdjax.models.stages import scan_to_unrolled, unrolled_to_scan
from sdjax.models.vit import VARIANTS as VIT_VARIANTS
from sdjax.models.vit import ViT

__all__ = [
    "CifarResNet",
    "ConvNeXt",
    "EfficientNet",
    "ResNet",
    "ViT",
    "batch_gates",
    "create",
    "names",
    "scan_to_unrolled",
    "unrolled_to_scan",
]


def _registry() -> dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]]:
    registry: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {}
    for depth in CIFAR_DEPTHS:
        registry[f"cifar_resnet{depth}"] = (CifarResNet, {"depth": depth})
    for depth in RESNET_DEPTHS:
        registry[f"resnet{depth}"] = (ResNet, {"depth": depth})
    for variant, spec in EFFICIENTNET_VARIANTS.items():
        registry[f"efficientnet_{variant}"] = (EfficientNet, spec._asdict())
    for variant, fields in VIT_VARIANTS.items():
        registry[f"vit_{variant}"] = (ViT, fields)
    for variant, fields in CONVNEXT_VARIANTS.items():
        registry[f"convnext_{variant}"] = (ConvNeXt, fields)
    return registry


_REGISTRY = _registry()


def names() -> list[str]:
    """The registered model names, in a stable order."""
    return list(_REGISTRY)


def create(name: str, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name`` with its defaults, overridden by ``overrides``.

    Args:
      name: one of :func:`names`, e.g. ``"cifar_resnet110"``, ``"resnet50"``,
        ``"efficientnet_b0"``.
      **overrides: model fields, e.g. ``final_drop_rate=0.0``, ``drop_mode="row"``,
        ``num_classes=100``, ``scan_blocks=False``, ``dtype=jnp.bfloat16``.

    Returns:
      An unbound Flax Linen module.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid names), an override that is not
        a field of the model (lists the valid fields), or an invalid field value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(_REGISTRY)}.")
    cls, defaults = _REGISTRY[name]
    fields = dataclass_fields(cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"{name}: unknown field(s) {', '.join(unknown)}; valid fields of "
            f"{cls.__name__}: {', '.join(fields)}."
        )
    if "depth" in overrides and overrides["depth"] != defaults["depth"]:
        raise ValueError(
            f"{name}: depth is fixed by the name (depth={defaults['depth']}); pick another name."
        )
    return cls(**{**defaults, **overrides})
