"""The fields every sdjax model has, their validation, and the per-block drop rates.

:class:`StochasticDepthModel` is the base class of :class:`~sdjax.models.CifarResNet`,
:class:`~sdjax.models.ResNet` and :class:`~sdjax.models.EfficientNet`. It declares the shared
fields once (keyword-only, with the paper's defaults; a model restates only a default it
changes), checks them at construction time (before anything is compiled), and builds the
``conv`` / ``norm`` / ``drop_path`` factories the model hands to its blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import schedules
from sdjax.checks import check_count, check_rate
from sdjax.conv import IMPLS
from sdjax.layers import DropPathResidual
from sdjax.models.conv_norm import Conv
from sdjax.ops import RESIDUAL_MODES

__all__ = [
    "StochasticDepthModel",
    "check_drop_rate_scale",
    "check_input",
    "dataclass_fields",
    "model_key",
    "model_default",
    "scale_rate",
]

Array = jax.Array
Rate = Any  # a Python float, or a float32 0-d array (scanned or scaled)


def _check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}.")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}.")


def _check_positive_int(value: Any, name: str) -> None:
    check_count(value, name, 1)


def _check_real(value: Any, name: str, low: float, high: float, allowed: str) -> None:
    is_real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not is_real or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}.")


def _check_float_dtype(value: Any, name: str) -> None:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype (e.g. jnp.float32, jnp.bfloat16), got {value!r}."
        )


def model_default(default: Any) -> Any:
    """A model's own default for a shared field, e.g. ``num_classes: int = model_default(1000)``.

    The field stays keyword-only (a plain ``= 1000`` would make it the model's first positional
    argument).
    """
    return dataclasses.field(default=default, kw_only=True)


class StochasticDepthModel(nn.Module, kw_only=True):
    """Base class of the sdjax models: the shared fields (keyword-only) and their checks.

    Attributes:
      num_classes: number of output logits (positive int; 10).
      final_drop_rate: stochastic depth: the drop probability the schedule scales (the last
        block's rate for ``"linear"``/``"uniform"``, EfficientNet's ``drop_connect_rate`` for
        ``"efficientnet"``). 0 = constant depth. In ``[0, 1]`` (0.5, the paper's).
      drop_schedule: ``"linear"`` | ``"uniform"`` | ``"efficientnet"`` (see
        :mod:`sdjax.schedules`; ``"linear"``).
      drop_mode: one of :data:`sdjax.ops.RESIDUAL_MODES`, passed to
        :class:`sdjax.layers.DropPathResidual`: ``"batch"`` (one gate per block for the whole
        batch; dropped blocks are not computed and do not update BatchNorm; the default),
        ``"row"`` (one Bernoulli gate per sample; every branch computed, then masked) or
        ``"row_subset"`` (exactly ``k`` random samples per shard run the branch, the others
        are not computed; a BatchNorm in the branch normalises over the samples it runs on;
        the rule: :mod:`sdjax.row_subset`; in a scanned stage: :mod:`sdjax.models.stages`).
      drop_shards: ``"row_subset"`` only: the number of contiguous shards of the batch axis
        that draw their own subsets (positive int; 1). Set it to the number of devices the
        batch is sharded over, so each device draws its subset from its own samples and the
        gather/scatter stay on the device; the training batch size must be divisible by it.
        With 1 (any device layout) one subset is drawn
        over the whole batch, which is correct but gathers across devices when the batch is
        sharded. Ignored by the other modes.
      scale_by_keep: train-time scaling by ``1 / (1 - rate)`` (True) or the paper's eval-time
        scaling by ``1 - rate`` (False, the default).
      scan_blocks: apply each stage's identical blocks with one ``nn.scan`` (True: fast compiles
        and steps; variables of blocks ``1..n-1`` of a stage are stacked, see
        :func:`sdjax.models.scan_to_unrolled`). False: one submodule per block.
      remat: ``nn.remat`` every block (recompute activations in the backward pass; False).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, logits are float32.
      conv_impl: ``"auto"`` | ``"xla_custom_vjp"`` | ``"xla"`` | ``"onednn"`` (see :func:`sdjax.conv.conv2d`; ``"auto"``).
      input_channels: expected channels of the input images (3).
      bn_momentum / bn_epsilon: BatchNorm running-average momentum and epsilon (0.9 / 1e-5).

    Subclasses define ``num_blocks``, restate a changed default with :func:`model_default`, and call
    ``super().__post_init__()`` after their own checks.
    """

    num_classes: int = 10
    final_drop_rate: float = 0.5
    drop_schedule: str = "linear"
    drop_mode: str = "batch"
    drop_shards: int = 1
    scale_by_keep: bool = False
    scan_blocks: bool = True
    remat: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    input_channels: int = 3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        try:
            _check_positive_int(self.num_classes, "num_classes")
            check_rate(self.final_drop_rate, "final_drop_rate")
            _check_choice(self.drop_schedule, "drop_schedule", tuple(schedules.SCHEDULES))
            _check_choice(self.drop_mode, "drop_mode", RESIDUAL_MODES)
            _check_positive_int(self.drop_shards, "drop_shards")
            for field in ("scale_by_keep", "scan_blocks", "remat"):
                _check_bool(getattr(self, field), field)
            _check_float_dtype(self.dtype, "dtype")
            _check_choice(self.conv_impl, "conv_impl", IMPLS)
            _check_positive_int(self.input_channels, "input_channels")
            _check_real(self.bn_momentum, "bn_momentum", 0.0, 1.0, "in [0, 1]")
            _check_real(self.bn_epsilon, "bn_epsilon", 1e-30, math.inf, "> 0")
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        super().__post_init__()

    @property
    def num_blocks(self) -> int:
        """The number of residual blocks ``L`` (defined by each model)."""
        raise NotImplementedError

    def block_rates(self, num_blocks: int) -> tuple[float, ...]:
        """The schedule's drop rates of ``num_blocks`` blocks, in forward order."""
        return schedules.get(self.drop_schedule)(num_blocks, self.final_drop_rate)

    def effective_block_rates(self) -> tuple[float, ...]:
        """The drop rate each of the model's ``num_blocks`` blocks trains with, in forward order.

        The schedule's rates (:meth:`block_rates`), except 0.0 for a block that cannot be dropped
        (EfficientNet's blocks without an identity shortcut).
        """
        return tuple(self.block_rates(self.num_blocks))

    def block_defs(self, train: bool) -> dict[str, Any]:
        """The ``conv``, ``norm`` and ``drop_path`` factories every block takes.

        ``conv``: :class:`~sdjax.models.conv_norm.Conv` in ``dtype`` with ``conv_impl``;
        ``norm``: ``nn.BatchNorm`` (batch statistics when ``train``, running averages
        otherwise); ``drop_path``: :class:`sdjax.layers.DropPathResidual` with ``drop_mode``,
        ``scale_by_keep`` and ``num_shards=drop_shards`` (the block adds its ``min_rate``).
        """
        return dict(
            conv=functools.partial(Conv, dtype=self.dtype, impl=self.conv_impl),
            norm=functools.partial(
                nn.BatchNorm,
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
            ),
            drop_path=functools.partial(
                DropPathResidual,
                mode=self.drop_mode,
                scale_by_keep=self.scale_by_keep,
                num_shards=self.drop_shards,
            ),
        )


def check_input(x: Any, *, model: str, input_channels: int, min_size: int) -> Array:
    """Checks a model input at trace time and returns it as an array.

    Raises:
      ValueError: ``x`` is not a float array of shape ``(N, H, W, input_channels)`` with
        ``H, W >= min_size`` (the network's total stride).
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(
            f"{model}: expected images of shape (batch, height, width, {input_channels}) "
            f"(NHWC, rank 4), got shape {x.shape} (rank {x.ndim})."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model}: expected floating-point images (normalize/cast them first), got dtype "
            f"{x.dtype}."
        )
    if x.shape[-1] != input_channels:
        raise ValueError(
            f"{model}: expected {input_channels} input channels (field input_channels), got "
            f"shape {x.shape} with {x.shape[-1]} channels (NHWC layout expected)."
        )
    if x.shape[1] < min_size or x.shape[2] < min_size:
        raise ValueError(
            f"{model}: images must be at least {min_size}x{min_size} (the network's total "
            f"stride), got {x.shape[1]}x{x.shape[2]}."
        )
    return x


def check_drop_rate_scale(drop_rate_scale: Any, model: str) -> Array | None:
    """Validates a model's ``drop_rate_scale`` call argument; returns it as float32 or None.

    Args:
      drop_rate_scale: None, or a real scalar (Python/NumPy number or a 0-d array, possibly
        traced) multiplying every block's drop rate. Python and NumPy values must be finite and
        >= 0; a JAX array is not checked (it may be traced; :mod:`sdjax.ops` clips the
        resulting rates to ``[0, 1]``).
      model: the model's name, for the error message.

    Returns:
      None, or a float32 0-d array.

    Raises:
      ValueError: not a scalar, not a real number, or a negative / non-finite host value.
    """
    if drop_rate_scale is None:
        return None
    value = drop_rate_scale
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
    ):
        raise ValueError(
            f"{model}: drop_rate_scale must be None or a real scalar (multiplies every block's "
            f"drop rate), got {drop_rate_scale!r}."
        )
    value = jnp.asarray(value)
    if value.ndim != 0 or not (
        jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{model}: drop_rate_scale must be a real scalar (shape ()), got shape {value.shape} "
            f"and dtype {value.dtype}."
        )
    if not isinstance(drop_rate_scale, jax.Array):  # a host value (a JAX array may be traced)
        host = float(np.asarray(drop_rate_scale))
        if not math.isfinite(host) or host < 0:
            raise ValueError(
                f"{model}: drop_rate_scale must be finite and >= 0, got {drop_rate_scale!r}."
            )
    return value.astype(jnp.float32)


def scale_rate(rate: Rate, drop_rate_scale: Array | None) -> Rate:
    """A block's drop rate times ``drop_rate_scale`` (float32), or the rate itself.

    The scaled rate is the block's rate on every path: the drop probability in training and,
    with ``scale_by_keep=False``, the eval factor ``1 - rate``.

    ``drop_rate_scale=None`` returns ``rate`` unchanged (a Python float stays static). A static
    rate of 0 stays the Python 0.0 (such a block is never dropped and needs no key); any other
    rate becomes ``float32(rate) * drop_rate_scale``, the same arithmetic for unrolled blocks,
    scanned blocks and :func:`sdjax.models.batch_gates`.
    """
    if drop_rate_scale is None:
        return rate
    if isinstance(rate, numbers.Real) and float(rate) == 0.0:
        return rate
    return jnp.asarray(rate, jnp.float32) * drop_rate_scale


def model_key(module: nn.Module, stochastic: bool) -> Array | None:
    """The model's one stochastic-depth/dropout key per forward pass, or None if not needed.

    Args:
      module: the model (call from its compact ``__call__``).
      stochastic: True in training when some drop rate is positive.

    Returns:
      ``module.make_rng("dropout")`` when ``stochastic``; None otherwise, and also during
      ``init`` without a ``"dropout"`` rng (initialization then runs every block).

    Raises:
      ValueError: ``stochastic`` but no ``"dropout"`` rng was passed to ``apply``.
    """
    if not stochastic:
        return None
    if not module.has_rng("dropout"):
        if module.is_initializing():
            return None
        raise ValueError(
            f"{type(module).__name__}: training with stochastic depth/dropout needs a PRNG key: "
            'pass rngs={"dropout": key} to apply (or train=False, or final_drop_rate=0).'
        )
    return module.make_rng("dropout")


def dataclass_fields(cls: type) -> tuple[str, ...]:
    """The user-settable fields of a model class (excludes Flax's ``parent`` and ``name``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
