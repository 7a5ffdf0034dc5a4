"""Building blocks shared by the sdjax models: convolution, normalization, field checks, stages.

Everything here is Flax Linen. The pieces:

* :class:`Conv` -- a 2-D convolution over :func:`sdjax.conv.conv2d` (fast gradients on CPU),
  with parameters in ``param_dtype`` (float32) and compute in ``dtype`` (e.g. bfloat16).
* :func:`batch_norm` -- ``nn.BatchNorm`` configured for NHWC inputs (state in ``batch_stats``).
* :func:`pad_channels_shortcut` -- the parameter-free shortcut of the paper's CIFAR ResNets.
* :class:`StochasticDepthFields` -- the stochastic-depth and performance fields common to every
  model, with their validation (raised at construction time, before anything is compiled).
* :func:`apply_stage` -- applies a stage's first block and then its identical remaining blocks,
  either unrolled or with ``nn.scan`` (and optionally ``nn.remat``); both layouts draw the same
  drop gates because every block derives its key as ``fold_in(model_key, block_index)``.
* :func:`scan_to_unrolled` / :func:`unrolled_to_scan` -- convert variables between the two layouts.
* :func:`batch_gates` -- the batch-mode gates a training key draws (which blocks run), without
  running the model.

Naming convention of stages (the contract of the two converters): the first block of a stage is
the submodule ``"<stage>_block0"``; the remaining ``n - 1`` blocks are ``"<stage>_block1"`` ...
``"<stage>_block<n-1>"`` when unrolled, or one scanned submodule ``"<stage>_rest"`` whose
variables carry a leading axis of size ``n - 1`` when ``scan_blocks=True``.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import schedules
from sdjax.conv import IMPLS, conv2d
from sdjax.layers import DropPathResidual
from sdjax.ops import DROP_PATH_MODES, batch_keep, check_rate

__all__ = [
    "Conv",
    "StochasticDepthFields",
    "apply_stage",
    "batch_gates",
    "batch_norm",
    "check_input",
    "conv_kernel_init",
    "model_key",
    "pad_channels_shortcut",
    "scan_to_unrolled",
    "unrolled_to_scan",
]

Array = jax.Array
Dtype = Any

#: He/Kaiming normal with fan-out, as in the paper's Torch code and the reference EfficientNet.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """2-D convolution (NHWC input, HWIO kernel) computed by :func:`sdjax.conv.conv2d`.

    Attributes:
      features: number of output channels.
      kernel_size: ``(KH, KW)``.
      strides: ``(SH, SW)`` or one int.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo_h, hi_h), (lo_w, hi_w))``.
      feature_group_count: channel groups; the number of input channels for a depthwise conv.
      use_bias: add a learned bias (off by default: every conv here is followed by BatchNorm).
      dtype: compute dtype; the input and the kernel are cast to it.
      param_dtype: dtype of the stored parameters (float32).
      kernel_init / bias_init: initializers.
      impl: ``conv2d``'s implementation switch, ``"auto"`` | ``"fast"`` | ``"xla"``.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = (1, 1)
    padding: Any = "SAME"
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init
    bias_init: Callable = nn.initializers.zeros
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x: ``(N, H, W, C_in)``. Returns: ``(N, H_out, W_out, features)`` in ``dtype``."""
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"Conv: {in_features} input channels are not divisible by "
                f"feature_group_count={self.feature_group_count}."
            )
        kernel_shape = (
            *self.kernel_size,
            in_features // self.feature_group_count,
            self.features,
        )
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        y = conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            strides=self.strides,
            padding=self.padding,
            feature_group_count=self.feature_group_count,
            impl=self.impl,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def batch_norm(
    train: bool,
    *,
    momentum: float,
    epsilon: float,
    dtype: Dtype,
    scale_init: Callable = nn.initializers.ones,
    name: str | None = None,
) -> nn.BatchNorm:
    """A ``nn.BatchNorm`` over the channel axis of NHWC inputs.

    In training it normalizes with the batch statistics and updates the running averages in the
    ``batch_stats`` collection (``ra = momentum * ra + (1 - momentum) * batch``); in evaluation
    it uses the running averages. Statistics are reduced in float32 even for a bfloat16 ``dtype``.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )


def pad_channels_shortcut(x: Array, features: int, strides: int) -> Array:
    """The parameter-free shortcut of the paper's CIFAR ResNets ("option A" with pooling).

    Args:
      x: ``(N, H, W, C)``.
      features: output channels ``C_out >= C``; channels ``C..C_out-1`` are zeros.
      strides: 1 (no pooling) or 2 (2x2 average pooling with stride 2; "SAME" padding for odd
        sizes, padded cells are not counted, so the size matches a stride-2 "SAME" conv).

    Returns:
      ``(N, ceil(H / strides), ceil(W / strides), features)``, same dtype as ``x``.
    """
    if strides != 1:
        x = nn.avg_pool(
            x,
            (strides, strides),
            strides=(strides, strides),
            padding="SAME",
            count_include_pad=False,
        )
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(f"pad_channels_shortcut: cannot shrink {x.shape[-1]} to {features}.")
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x


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


def _check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}.")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}.")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class StochasticDepthFields:
    """Validation of the fields every sdjax model has (mixed into the model dataclasses).

    Fields (declared on each model with the model's own defaults):
      num_classes: number of output logits (positive int).
      final_drop_rate: stochastic depth: the drop probability that the schedule scales (the last
        block's rate for ``"linear"``/``"uniform"``, EfficientNet's ``drop_connect_rate`` for
        ``"efficientnet"``). 0 = constant depth. In ``[0, 1]``.
      drop_schedule: ``"linear"`` | ``"uniform"`` | ``"efficientnet"`` (see
        :mod:`sdjax.schedules`).
      drop_mode: ``"batch"`` (one gate per block for the whole batch; dropped blocks are not
        computed and do not update BatchNorm) | ``"row"`` (one gate per sample; computed, masked).
      scale_by_keep: train-time scaling by ``1 / (1 - rate)`` (True) or the paper's eval-time
        scaling by ``1 - rate`` (False).
      scan_blocks: apply each stage's identical blocks with ``nn.scan`` (fast compiles).
      remat: ``nn.remat`` every block (recompute activations in the backward pass).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, logits are float32.
      conv_impl: ``"auto"`` | ``"fast"`` | ``"xla"`` (see :func:`sdjax.conv.conv2d`).
      input_channels: expected channels of the input images.
    """

    def _check_common_fields(self) -> None:
        name = type(self).__name__
        try:
            _check_positive_int(self.num_classes, "num_classes")
            check_rate(self.final_drop_rate, "final_drop_rate")
            _check_choice(self.drop_schedule, "drop_schedule", tuple(schedules.SCHEDULES))
            _check_choice(self.drop_mode, "drop_mode", DROP_PATH_MODES)
            for field in ("scale_by_keep", "scan_blocks", "remat"):
                _check_bool(getattr(self, field), field)
            _check_choice(self.conv_impl, "conv_impl", IMPLS)
            _check_positive_int(self.input_channels, "input_channels")
            try:
                dtype = jnp.dtype(self.dtype)
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"dtype must be a floating dtype (e.g. jnp.float32, jnp.bfloat16), got "
                    f"{self.dtype!r}."
                )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def block_rates(self, num_blocks: int) -> tuple[float, ...]:
        """The per-block drop rates of the ``num_blocks`` blocks, in forward order."""
        return schedules.get(self.drop_schedule)(num_blocks, self.final_drop_rate)

    def effective_block_rates(self) -> tuple[float, ...]:
        """The drop rate each of the model's ``num_blocks`` blocks trains with, in forward order.

        The schedule's rates (:meth:`block_rates`), except 0.0 for a block that cannot be dropped
        (EfficientNet's blocks without an identity shortcut).
        """
        return tuple(self.block_rates(self.num_blocks))


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


def _dropout_key(module: nn.Module) -> Array:
    return module.make_rng("dropout")


def batch_gates(model: nn.Module, key: Array) -> Array:
    """The batch-mode gates that ``model.apply(..., train=True, rngs={"dropout": key})`` draws.

    Computed from the key and the model's drop rates alone: no parameters and no forward pass,
    so it is cheap to call per step (e.g. to log how many blocks a step computed).

    Args:
      model: an sdjax model (:mod:`sdjax.models`), scanned or unrolled.
      key: the ``"dropout"`` PRNG key of the training step.

    Returns:
      A ``bool`` array of shape ``(model.num_blocks,)``, in forward order: ``True`` where the
      block's residual branch is computed. Blocks that cannot be dropped (rate 0, e.g.
      EfficientNet's blocks without an identity shortcut) are ``True``. With
      ``drop_mode="batch"`` these are exactly the blocks the step computes; in row mode each
      block draws per-sample masks from the same block key instead, and this gate is not used.
      A scanned stage compares its float32 rate with the random bits, so its gate can differ
      from this one in the rare draws that fall between the float32 and float64 thresholds
      (probability below 1e-6 per block).
    """
    rates = model.effective_block_rates()
    top = model.apply({}, rngs={"dropout": key}, method=_dropout_key)
    return jnp.stack([batch_keep(jax.random.fold_in(top, b), r) for b, r in enumerate(rates)])


def relu_residual(
    block: nn.Module,
    branch: nn.Module,
    x: Array,
    shortcut: Array,
    rate: Any,
    block_index: Any,
    key: Array | None,
) -> Array:
    """``relu(shortcut + drop_path(branch(x)))``: the residual add of the ResNet blocks.

    Call from ``block``'s compact ``__call__``; ``block`` carries the ``drop_mode`` and
    ``scale_by_keep`` fields, and the :class:`sdjax.layers.DropPathResidual` becomes its child
    ``"residual"``. ``key`` is the model's stochastic-depth key (None: deterministic); the block's
    gate key is ``fold_in(key, block_index)``. ``rate`` may be a traced 0-d array (``nn.scan``).
    """
    y = DropPathResidual(
        branch=branch,
        rate=rate,
        mode=block.drop_mode,
        scale_by_keep=block.scale_by_keep,
        name="residual",
    )(
        x,
        shortcut,
        deterministic=key is None,
        rng=None if key is None else jax.random.fold_in(key, block_index),
    )
    return nn.relu(y)


def _scan_body(block: nn.Module, x: Array, xs: tuple[Array, Array], key: Array | None):
    rate, block_index = xs
    return block(x, rate, block_index, key), None


def apply_stage(
    block_cls: type[nn.Module],
    x: Array,
    *,
    name: str,
    first_kwargs: Mapping[str, Any],
    rest_kwargs: Mapping[str, Any],
    rates: Sequence[float],
    first_index: int,
    key: Array | None,
    scan_blocks: bool,
    remat: bool,
) -> Array:
    """Applies the ``len(rates)`` blocks of one stage (call from a compact method).

    The block modules are called as ``block(x, rate, block_index, key)`` and must derive their
    drop key as ``jax.random.fold_in(key, block_index)`` (``key=None``: no dropping).

    Args:
      block_cls: the block module class.
      x: the stage input.
      name: stage name; submodules are ``f"{name}_block{i}"`` and, scanned, ``f"{name}_rest"``.
      first_kwargs: constructor fields of the first block (e.g. strides 2, new width).
      rest_kwargs: constructor fields of the remaining, identical blocks.
      rates: drop rate of each block of the stage (Python floats).
      first_index: global (network-wide, 0-based) index of the stage's first block.
      key: the model's stochastic-depth key, or None.
      scan_blocks: apply blocks ``1..n-1`` with one ``nn.scan`` (their variables stacked).
      remat: wrap every block in ``nn.remat``.

    Returns:
      The output of the last block.
    """
    cls = nn.remat(block_cls, prevent_cse=not scan_blocks) if remat else block_cls
    x = cls(name=f"{name}_block0", **first_kwargs)(x, rates[0], first_index, key)
    num_rest = len(rates) - 1
    if num_rest == 0:
        return x
    if scan_blocks:
        scanned = nn.scan(
            _scan_body,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=num_rest,
        )
        xs = (
            jnp.asarray(rates[1:], jnp.float32),
            jnp.arange(first_index + 1, first_index + 1 + num_rest, dtype=jnp.int32),
        )
        x, _ = scanned(cls(name=f"{name}_rest", **rest_kwargs), x, xs, key)
        return x
    for i in range(1, num_rest + 1):
        x = cls(name=f"{name}_block{i}", **rest_kwargs)(x, rates[i], first_index + i, key)
    return x


_REST = re.compile(r"^(?P<stage>.+)_rest$")
_BLOCK = re.compile(r"^(?P<stage>.+)_block(?P<index>\d+)$")


def _is_mapping(tree: Any) -> bool:
    return isinstance(tree, Mapping)


def scan_to_unrolled(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of a ``scan_blocks=True`` model to the unrolled layout.

    Every ``"<stage>_rest"`` entry (leaves with a leading block axis of size ``n - 1``) becomes
    ``"<stage>_block1"`` ... ``"<stage>_block<n-1>"``. Works on a whole variables dict
    (``{"params": ..., "batch_stats": ...}``) or on one collection. Returns new plain dicts.
    """
    out: dict[str, Any] = {}
    for key, value in variables.items():
        match = _REST.match(key) if isinstance(key, str) else None
        if match and _is_mapping(value):
            num = len(jax.tree_util.tree_leaves(value)[0])
            for i in range(num):
                out[f"{match['stage']}_block{i + 1}"] = jax.tree_util.tree_map(
                    lambda leaf, i=i: leaf[i], _to_dict(value)
                )
        elif _is_mapping(value):
            out[key] = scan_to_unrolled(value)
        else:
            out[key] = value
    return out


def unrolled_to_scan(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of an unrolled model to the ``scan_blocks=True`` layout.

    ``"<stage>_block1"`` ... ``"<stage>_block<n-1>"`` are stacked (leading axis) into
    ``"<stage>_rest"``; ``"<stage>_block0"`` stays. Inverse of :func:`scan_to_unrolled`.
    """
    out: dict[str, Any] = {}
    stacks: dict[str, dict[int, Any]] = {}
    for key, value in variables.items():
        match = _BLOCK.match(key) if isinstance(key, str) else None
        if match and int(match["index"]) >= 1 and _is_mapping(value):
            stacks.setdefault(match["stage"], {})[int(match["index"])] = _to_dict(value)
        elif _is_mapping(value):
            out[key] = unrolled_to_scan(value)
        else:
            out[key] = value
    for stage, blocks in stacks.items():
        if sorted(blocks) != list(range(1, len(blocks) + 1)):
            raise ValueError(f"unrolled_to_scan: blocks of {stage!r} are not 1..n-1: {blocks}.")
        ordered = [blocks[i] for i in range(1, len(blocks) + 1)]
        out[f"{stage}_rest"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ordered)
    return out


def _to_dict(tree: Any) -> Any:
    if _is_mapping(tree):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def dataclass_fields(cls: type) -> tuple[str, ...]:
    """The user-settable fields of a model class (excludes Flax's ``parent`` and ``name``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))
