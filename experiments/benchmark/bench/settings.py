"""Benchmark settings and workloads: what is timed, on which input, with which model fields.

A setting name is a base stochastic-depth mode, an optional ``@RATE``, plus ``+`` modifiers,
e.g. ``"batch+scan+dp"`` or ``"row_subset@0.4+scan"``:

* bases: ``constant`` (``final_drop_rate=0``), ``row`` (masked per-sample drop path),
  ``row_subset`` (``drop_mode="row_subset"``: the branch runs on a fixed-size random subset of
  the samples), ``batch`` (one gate per block and step, a dropped branch is skipped).
* ``@RATE`` (not on ``constant``): this row's ``final_drop_rate`` instead of the workload's,
  e.g. ``row@0.1``. The base with its rate (``Setting.peer``) names the PyTorch peer's row, and
  rows of different rates are compared separately (`experiments.benchmark.bench.analysis`).
* modifiers: ``+xla`` / ``+fast`` (``conv_impl``), ``+scan`` (``scan_blocks=True``, the models'
  default, stated explicitly), ``+unrolled`` (``scan_blocks=False``: one submodule per block),
  ``+onescan`` (ViT/ConvNeXt only: ``subset_scan_groups=1``, row-subset's scanned blocks in one
  scan padded to the stage's largest subset, as before the groups),
  ``+dp`` (data-parallel over all devices; not a model field; a ``row_subset+...+dp`` row sets
  ``drop_shards`` to the device count, so each device draws its subset from its own samples).
  A name without ``+scan`` or ``+unrolled`` gets the model's default (scanned).

A workload is the input of one model: the sdjax models take synthetic NHWC images; the
transformer MLP stack (`experiments.benchmark.bench.transformer`) takes ``(N, tokens, width)`` tokens and
has its own drop rate, schedule and settings. The ViTs (``vit_*``) take ImageNet-shaped images
(``--vit_image_size``, default 224) with 1000 classes and have their own settings (`VIT_SETTINGS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from experiments.benchmark.bench import transformer
from sdjax import layers, models

BASE_SETTINGS = ("constant", "row", "row_subset", "batch")
MODIFIERS = {
    "xla": {"conv_impl": "xla"},
    "fast": {"conv_impl": "xla_custom_vjp"},  # the label of rows recorded before 0.2.0
    "scan": {"scan_blocks": True},
    "unrolled": {"scan_blocks": False},
    "onescan": {"subset_scan_groups": 1},  # ViT/ConvNeXt: one padded scan per stage
}
DATA_PARALLEL = "dp"  # the runtime modifier: shard the batch over all devices
DEFAULT_MODELS = (
    "cifar_resnet56",
    "cifar_resnet110",
    "efficientnet_b0",
    transformer.NAME,
    "vit_s16",
)
DEFAULT_SETTINGS = tuple(
    f"{base}+scan{dp}" for dp in ("", "+dp") for base in ("constant", "row", "row_subset", "batch")
)
DEFAULT_EXTRA = (  # unrolled blocks and the stock XLA convolution, for comparison
    "cifar_resnet56:constant+unrolled",
    "cifar_resnet56:constant+unrolled+xla",
    "cifar_resnet110:constant+unrolled",
)
DEFAULT_COMPILE_ONLY = ("cifar_resnet1202",)
QUICK_SETTINGS = ("constant", "row", "row_subset", "batch")
NUM_CLASSES = 10

# The transformer MLP stack: DINOv2's setting for the row-subset residual.
TRANSFORMER_SETTINGS = ("constant", "row", "row_subset")
TRANSFORMER_FIELDS = {"num_blocks": 12, "hidden_ratio": 4}
TRANSFORMER_DROP = (0.4, "uniform")  # (final_drop_rate, drop_schedule)
TRANSFORMER_INPUT = (64, 384)  # (tokens, width)
TRANSFORMER_BATCH = 64
TRANSFORMER_MODIFIERS = (DATA_PARALLEL,)

# The ViTs (`sdjax.models.vit`, ``vit_*``): DeiT's drop rate 0.1 and DINOv2's 0.4, at the models'
# default schedule (``--drop_schedule linear``: timm's ``linspace(0, rate, depth)``).
VIT_PREFIX = "vit_"
VIT_SETTINGS = (
    "constant",
    "row@0.1",
    "row_subset@0.1",
    "row@0.4",
    "row_subset@0.4",
)
VIT_NUM_CLASSES = 1000


def is_vit(name: str) -> bool:
    """Whether ``name`` is one of the registry's ViTs (ImageNet-shaped workload, 1000 classes)."""
    return name.startswith(VIT_PREFIX)


def num_classes(name: str) -> int:
    """The classes of model ``name`` in the benchmark: 1000 for the ViTs, `NUM_CLASSES` else."""
    return VIT_NUM_CLASSES if is_vit(name) else NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named benchmark setting: the base stochastic-depth mode plus model-field modifiers."""

    name: str
    base: str
    overrides: dict[str, Any]
    data_parallel: bool = False

    @property
    def peer(self) -> str:
        """The base with its ``@RATE``, if any (``"row@0.4"``): the PyTorch peer's setting name."""
        return self.name.split("+")[0]

    @property
    def variant(self) -> str:
        """The modifiers of the name, e.g. ``"+scan+dp"`` (``""`` for a base setting)."""
        return self.name[len(self.peer) :]


def parse_setting(name: str, final_drop_rate: float, drop_schedule: str) -> Setting:
    """``"batch+scan+dp"`` -> Setting(base="batch", overrides={...}, data_parallel=True).

    Args:
      name: base, optional ``@RATE`` and modifiers, e.g. ``"row@0.1+scan"``.
      final_drop_rate, drop_schedule: the stochastic-depth fields of the non-constant bases
        (``@RATE`` replaces ``final_drop_rate``).

    Raises:
      ValueError: an unknown base or modifier (the message lists the allowed ones), a rate that
        is not a number in ``[0, 1]``, or a rate on ``constant``.
    """
    peer, *mods = name.split("+")
    base, at, rate_text = peer.partition("@")
    if base not in BASE_SETTINGS:
        raise ValueError(f"setting {name!r}: base must be one of {BASE_SETTINGS}, got {base!r}")
    if at:
        if base == "constant":
            raise ValueError(f"setting {name!r}: constant depth takes no @RATE")
        try:
            final_drop_rate = float(rate_text)
        except ValueError:
            final_drop_rate = math.nan
        if not 0.0 <= final_drop_rate <= 1.0:
            raise ValueError(
                f"setting {name!r}: @RATE must be a drop rate in [0, 1], got {rate_text!r}"
            )
    if base == "constant":
        overrides: dict[str, Any] = {"final_drop_rate": 0.0}
    else:
        overrides = {
            "final_drop_rate": final_drop_rate,
            "drop_schedule": drop_schedule,
            "drop_mode": base,
        }
    data_parallel = False
    for mod in mods:
        if mod == DATA_PARALLEL:
            data_parallel = True
        elif mod in MODIFIERS:
            overrides.update(MODIFIERS[mod])
        else:
            allowed = sorted([*MODIFIERS, DATA_PARALLEL])
            raise ValueError(f"setting {name!r}: modifier must be one of {allowed}, got {mod!r}")
    return Setting(name, base, overrides, data_parallel)


def model_names() -> list[str]:
    """Every name the benchmark can time: the sdjax registry and the transformer MLP stack."""
    return [*models.names(), transformer.NAME]


@dataclasses.dataclass(frozen=True)
class Workload:
    """The input of one model and its stochastic-depth schedule.

    Attributes:
      batch_size: examples per step (global, over all devices of a ``+dp`` row).
      input_shape: one example's shape: ``(H, W, 3)`` images or ``(tokens, width)``.
      final_drop_rate, drop_schedule: the rate and schedule of the non-constant settings
        (a setting's ``@RATE`` replaces the rate).
      num_classes: classes of the labels and the model's head.
    """

    batch_size: int
    input_shape: tuple[int, ...]
    final_drop_rate: float
    drop_schedule: str
    num_classes: int = NUM_CLASSES

    @property
    def image_size(self) -> int:
        """``H`` of an image workload; the token count of the transformer stack."""
        return self.input_shape[0]

    def setting(self, name: str) -> Setting:
        """`parse_setting` with this workload's rate and schedule."""
        return parse_setting(name, self.final_drop_rate, self.drop_schedule)


def workload(name: str, args: Any) -> Workload:
    """The workload of model ``name`` from the command-line arguments (batch and image sizes,
    drop rate and schedule); the transformer stack's is fixed (`TRANSFORMER_*`)."""
    if name == transformer.NAME:
        return Workload(TRANSFORMER_BATCH, TRANSFORMER_INPUT, *TRANSFORMER_DROP)
    if is_vit(name):
        size = args.vit_image_size
        return Workload(
            args.vit_batch_size,
            (size, size, 3),
            args.final_drop_rate,
            args.drop_schedule,
            VIT_NUM_CLASSES,
        )
    if name.startswith("efficientnet"):
        size, batch = args.efficientnet_image_size, args.efficientnet_batch_size
    else:
        size, batch = args.image_size, args.batch_size
    return Workload(batch, (size, size, 3), args.final_drop_rate, args.drop_schedule)


def synthetic_batch(wl: Workload, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal float32 inputs ``(N, *input_shape)`` and int32 labels in
    ``[0, wl.num_classes)``, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((wl.batch_size, *wl.input_shape), np.float32)
    labels = rng.integers(0, wl.num_classes, (wl.batch_size,), dtype=np.int32)
    return inputs, labels


def check_layer_mode(mode: str) -> None:
    """Raises ValueError unless `sdjax.layers.DropPathResidual` accepts ``mode``.

    The message names the mode and the layer's error (``row_subset`` needs an sdjax with the
    row-subset residual).
    """
    try:
        layers.DropPathResidual(nn.Dense(1), rate=0.5, mode=mode)
    except ValueError as error:
        raise ValueError(
            f"setting base {mode!r}: sdjax.layers.DropPathResidual does not accept "
            f"mode={mode!r} in this version of sdjax ({error}); use the settings "
            f"{', '.join(b for b in BASE_SETTINGS if b != mode)} or an sdjax with that mode"
        ) from None


def build_model(
    name: str, setting: Setting, dtype: str | None = None, devices: int = 1
) -> nn.Module:
    """The unbound model of ``name`` in ``setting`` (``dtype``: compute dtype override).

    ``devices``: the number of devices a ``+dp`` row shards the batch over; a ``row_subset``
    ``+dp`` row passes it as ``drop_shards`` (one subset per device). Ignored otherwise.

    Raises:
      ValueError: a mode the installed sdjax lacks, a modifier the transformer stack does not
        take, or a model field the model rejects. Raised before anything compiles.
    """
    if setting.base != "constant":
        check_layer_mode(setting.base)
    overrides = dict(setting.overrides)
    if setting.base == "row_subset" and setting.data_parallel:
        overrides["drop_shards"] = devices
    if dtype:
        overrides["dtype"] = jnp.dtype(dtype)
    if name == transformer.NAME:
        mods = setting.name.split("+")[1:]
        bad = [m for m in mods if m not in TRANSFORMER_MODIFIERS]
        if bad:
            raise ValueError(
                f"{name} {setting.name}: modifiers {bad} are not supported; allowed: "
                f"{list(TRANSFORMER_MODIFIERS)}"
            )
        return transformer.TransformerMLPStack(
            num_classes=NUM_CLASSES, **TRANSFORMER_FIELDS, **overrides
        )
    try:
        return models.create(name, num_classes=num_classes(name), **overrides)
    except ValueError as error:
        raise ValueError(f"{name} {setting.name}: {error}") from None
