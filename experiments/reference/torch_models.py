"""PyTorch eager peers of the sdjax models: the benchmark's timing column and the reference trainer.

These are baselines, not part of the library: they exist so that the benchmark can time the same
networks, at the same batch size and on the same cores, in the framework most stochastic-depth
code is written in. Two stochastic-depth variants are provided, selected by `drop_mode`:

* ``"row"``: timm-style per-sample DropPath. The residual branch is always computed; its output
  is multiplied by a per-sample Bernoulli mask (one draw per sample, i.e. per row of the batch)
  and, when ``scale_by_keep`` is true, divided by the keep probability ``1 - drop_rate``.
* ``"batch"``: the stochastic-depth paper's skip (Huang et al., 2016). One draw per block and
  step (``torch.rand(()) < drop_rate``, a host-side decision); a dropped branch is not computed
  at all, forward or backward, and its BatchNorm statistics are not updated.
* ``"row_subset"``: DINOv2's residual: the branch runs on ``k = max(1, round((1 - drop_rate) *
  N))`` samples drawn without replacement (``torch.randperm``) and is ``index_add``-ed into the
  shortcut, times ``N / k`` when ``scale_by_keep``; the other samples get the shortcut only.

Only the training-mode behaviour matters for the benchmark; evaluation follows the same
conventions as sdjax (identity for ``scale_by_keep=True``, branch times ``1 - drop_rate``
otherwise). Randomness comes from the global torch generator (``torch.manual_seed``).

Tensors are NCHW float32 (PyTorch's default layout; the transformer stack takes ``(N, tokens,
width)``); labels are int64 class indices.

This module imports torch at import time; import it only when torch is installed (the ``bench``
extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DROP_MODES = ("row", "batch", "row_subset")
TRANSFORMER_NAME = "transformer_mlp_stack"


def _check_drop_mode(drop_mode: str) -> str:
    if drop_mode not in DROP_MODES:
        raise ValueError(f"drop_mode must be one of {DROP_MODES}, got {drop_mode!r}")
    return drop_mode


def drop_path_rows(x: torch.Tensor, drop_rate: float, scale_by_keep: bool) -> torch.Tensor:
    """timm-style per-sample DropPath (train mode).

    Args:
      x: tensor of shape ``(N, ...)``.
      drop_rate: probability in ``[0, 1]`` that a sample's branch output is zeroed.
      scale_by_keep: divide kept samples by ``1 - drop_rate`` (inverted scaling).

    Returns:
      A tensor of the same shape and dtype. ``drop_rate == 0`` returns ``x`` unchanged;
      ``drop_rate == 1`` returns zeros.
    """
    if drop_rate == 0.0:
        return x
    keep_prob = 1.0 - drop_rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class StochasticResidual(nn.Module):
    """``shortcut + drop_path(branch(x))`` with the row or batch stochastic-depth variant.

    Attributes:
      branch: the residual branch module.
      drop_rate: probability of dropping the branch in training.
      drop_mode: ``"row"`` (compute and mask per sample), ``"batch"`` (skip the whole branch) or
        ``"row_subset"`` (compute on a random subset of ``k`` samples; see the module docstring).
      scale_by_keep: inverted scaling of kept outputs in training (and identity at eval).
    """

    def __init__(self, branch: nn.Module, drop_rate: float, drop_mode: str, scale_by_keep: bool):
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        self.branch = branch
        self.drop_rate = float(drop_rate)
        self.drop_mode = _check_drop_mode(drop_mode)
        self.scale_by_keep = bool(scale_by_keep)
        # Batch mode only: how many training calls ran the branch, out of how many (diagnostics).
        self.branches_run = 0
        self.branches_seen = 0

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        keep_prob = 1.0 - self.drop_rate
        if not self.training or self.drop_rate == 0.0:
            out = self.branch(x)
            if not self.training and not self.scale_by_keep:
                out = out * keep_prob
            return shortcut + out
        if self.drop_mode == "row":
            return shortcut + drop_path_rows(self.branch(x), self.drop_rate, self.scale_by_keep)
        if self.drop_mode == "row_subset":
            if self.drop_rate == 1.0:
                return shortcut
            n = x.shape[0]
            k = max(1, round(keep_prob * n))
            index = torch.randperm(n, device=x.device)[:k]
            scale = n / k if self.scale_by_keep else 1.0
            return torch.index_add(shortcut, 0, index, self.branch(x[index]), alpha=scale)
        # Paper's batch-wise skip: one host-side draw, the dropped branch is never run.
        self.branches_seen += 1
        if float(torch.rand(())) < self.drop_rate:
            return shortcut
        self.branches_run += 1
        out = self.branch(x)
        if self.scale_by_keep:
            out = out / keep_prob
        return shortcut + out


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al., 2016), depth 6n+2, with the stochastic-depth paper's shortcut.
# ---------------------------------------------------------------------------------------------


class SamePadConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with TensorFlow/XLA ``"SAME"`` padding (as sdjax's convs).

    For stride 2 on an even input that pads 0 pixels before and 1 after (PyTorch's ``padding=1``
    pads 1 on both sides, shifting the sampling grid by one pixel). Construct with ``padding=0``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(
            x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True
        ):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class _CifarBranch(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int, same_padding: bool):
        conv1 = (
            SamePadConv2d(in_channels, out_channels, 3, stride=stride, padding=0, bias=False)
            if same_padding and stride != 1
            else nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        )
        super().__init__(
            conv1,
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class CifarBasicBlock(nn.Module):
    """Basic block: ``relu(shortcut(x) + drop_path(conv-bn-relu-conv-bn(x)))``.

    The shortcut is the paper's parameter-free one, as in `sdjax.models.CifarResNet`: identity,
    or for a downsampling block 2x2 average pooling with stride 2 followed by zero-padding of the
    new channels ("option A" with pooling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        drop_rate: float,
        drop_mode: str,
        scale_by_keep: bool,
        same_padding: bool = False,
    ):
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels
        self.residual = StochasticResidual(
            _CifarBranch(in_channels, out_channels, stride, same_padding),
            drop_rate,
            drop_mode,
            scale_by_keep,
        )

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x, self.shortcut(x)))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (3 stages of ``n`` basic blocks, 16/32/64 channels).

    Args:
      depth: 20, 32, 44, 56, 110, 1202, ... (``(depth - 2) % 6 == 0``).
      drop_rates: one drop rate per residual block (length ``3n``), in network order; ``None``
        means constant depth (all zeros).
      drop_mode: ``"row"`` or ``"batch"`` (see the module docstring).
      scale_by_keep: inverted scaling of kept branch outputs (the paper uses ``False``).
      num_classes: size of the classifier output.
      input_channels: channels of the input images (3; 1 for digits).
      same_padding: the stride-2 convolutions pad as XLA's ``"SAME"`` (sdjax; 0 before and 1
        after on even sizes) instead of PyTorch's ``padding=1`` (the paper's Torch code).

    Input ``(N, input_channels, H, W)`` float32; output logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        depth: int,
        drop_rates: Sequence[float] | None = None,
        drop_mode: str = "batch",
        scale_by_keep: bool = False,
        num_classes: int = 10,
        input_channels: int = 3,
        same_padding: bool = False,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth!r}")
        blocks_per_stage = (depth - 2) // 6
        num_blocks = 3 * blocks_per_stage
        drop_rates = [0.0] * num_blocks if drop_rates is None else [float(r) for r in drop_rates]
        if len(drop_rates) != num_blocks:
            raise ValueError(f"drop_rates must have {num_blocks} entries, got {len(drop_rates)}")
        self.stem = nn.Sequential(
            nn.Conv2d(input_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        blocks = []
        in_channels = 16
        for stage, channels in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                rate = drop_rates[len(blocks)]
                blocks.append(
                    CifarBasicBlock(
                        in_channels, channels, stride, rate, drop_mode, scale_by_keep, same_padding
                    )
                )
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# EfficientNet (Tan & Le, 2019), B0 layout, drop connect on the identity-skip MBConv blocks.
# ---------------------------------------------------------------------------------------------

# (expand_ratio, kernel_size, stride, out_channels, repeats) for EfficientNet-B0.
EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
EFFICIENTNET_B0_NUM_BLOCKS = sum(stage[-1] for stage in EFFICIENTNET_B0_STAGES)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF reference: decay 0.99 (PyTorch momentum 0.01), epsilon 1e-3.
    return nn.BatchNorm2d(channels, momentum=0.01, eps=1e-3)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(F.silu(self.reduce(scale))))
        return x * scale


class _MBConvBranch(nn.Sequential):
    def __init__(
        self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int
    ):
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), _bn(hidden), nn.SiLU()]
        layers += [
            nn.Conv2d(
                hidden,
                hidden,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=hidden,
                bias=False,
            ),
            _bn(hidden),
            nn.SiLU(),
            _SqueezeExcite(hidden, max(1, int(in_channels * 0.25))),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            _bn(out_channels),
        ]
        super().__init__(*layers)


class MBConvBlock(nn.Module):
    """Inverted-residual block; drop connect applies only when it has an identity skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        drop_rate: float,
        drop_mode: str,
        scale_by_keep: bool,
    ):
        super().__init__()
        branch = _MBConvBranch(in_channels, out_channels, expand_ratio, kernel_size, stride)
        self.has_skip = stride == 1 and in_channels == out_channels
        if self.has_skip:
            self.residual = StochasticResidual(branch, drop_rate, drop_mode, scale_by_keep)
        else:
            self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_skip:
            return self.residual(x, x)
        return self.branch(x)


class EfficientNet(nn.Module):
    """EfficientNet-B0 (width/depth multipliers 1.0) with per-block drop connect.

    Args:
      drop_rates: one rate per MBConv block (16 for B0), in network order; blocks without an
        identity skip ignore theirs. ``None`` means no drop connect.
      drop_mode: ``"row"`` (timm/reference) or ``"batch"`` (skip the whole branch).
      scale_by_keep: inverted scaling (the reference uses ``True``).
      num_classes: classifier size.
      dropout_rate: dropout before the classifier (reference 0.2).

    Input ``(N, 3, H, W)`` float32 (any H, W >= 32); output logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        drop_rates: Sequence[float] | None = None,
        drop_mode: str = "row",
        scale_by_keep: bool = True,
        num_classes: int = 1000,
        dropout_rate: float = 0.2,
    ):
        super().__init__()
        num_blocks = EFFICIENTNET_B0_NUM_BLOCKS
        drop_rates = [0.0] * num_blocks if drop_rates is None else [float(r) for r in drop_rates]
        if len(drop_rates) != num_blocks:
            raise ValueError(f"drop_rates must have {num_blocks} entries, got {len(drop_rates)}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), _bn(32), nn.SiLU()
        )
        blocks = []
        in_channels = 32
        for expand_ratio, kernel_size, stride, channels, repeats in EFFICIENTNET_B0_STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        channels,
                        expand_ratio,
                        kernel_size,
                        stride if index == 0 else 1,
                        drop_rates[len(blocks)],
                        drop_mode,
                        scale_by_keep,
                    )
                )
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_channels, 1280, 1, bias=False), _bn(1280), nn.SiLU())
        self.dropout = nn.Dropout(dropout_rate)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


# ---------------------------------------------------------------------------------------------
# Transformer MLP stack (experiments/benchmark/bench/transformer.py): pre-norm MLP blocks on tokens.
# ---------------------------------------------------------------------------------------------


class TransformerMLPStack(nn.Module):
    """``x + drop_path(MLP(LayerNorm(x)))`` blocks, then LayerNorm, token mean, classifier.

    Input ``(N, tokens, width)`` float32; GELU with the tanh approximation (Flax's default).
    """

    def __init__(
        self,
        drop_rates: Sequence[float] | None,
        drop_mode: str,
        scale_by_keep: bool,
        num_classes: int,
        *,
        num_blocks: int = 12,
        width: int = 384,
        hidden_ratio: int = 4,
    ):
        super().__init__()
        rates = list(drop_rates) if drop_rates is not None else [0.0] * num_blocks
        hidden = hidden_ratio * width
        self.blocks = nn.ModuleList(
            StochasticResidual(
                nn.Sequential(
                    nn.LayerNorm(width),
                    nn.Linear(width, hidden),
                    nn.GELU(approximate="tanh"),
                    nn.Linear(hidden, width),
                ),
                rate,
                drop_mode,
                scale_by_keep,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x)
        return self.head(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------------------------------------
# Factory and train step.
# ---------------------------------------------------------------------------------------------

CIFAR_DEPTHS = {f"cifar_resnet{d}": d for d in (20, 32, 44, 56, 110, 1202)}


def num_blocks(name: str) -> int:
    """Number of stochastic-depth blocks of the PyTorch peer called ``name``."""
    if name in CIFAR_DEPTHS:
        return (CIFAR_DEPTHS[name] - 2) // 2
    if name == "efficientnet_b0":
        return EFFICIENTNET_B0_NUM_BLOCKS
    if name == TRANSFORMER_NAME:
        return 12
    raise ValueError(f"no PyTorch peer for {name!r}; available: {sorted(available())}")


def available() -> tuple[str, ...]:
    """Names that `create` accepts (the sdjax model names that have a PyTorch peer)."""
    return (*CIFAR_DEPTHS, "efficientnet_b0", TRANSFORMER_NAME)


def create(
    name: str,
    *,
    drop_rates: Sequence[float] | None,
    drop_mode: str,
    scale_by_keep: bool,
    num_classes: int,
) -> nn.Module:
    """Builds the PyTorch peer of the sdjax model ``name`` (see `available`)."""
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], drop_rates, drop_mode, scale_by_keep, num_classes)
    if name == "efficientnet_b0":
        return EfficientNet(drop_rates, drop_mode, scale_by_keep, num_classes)
    if name == TRANSFORMER_NAME:
        return TransformerMLPStack(drop_rates, drop_mode, scale_by_keep, num_classes)
    raise ValueError(f"no PyTorch peer for {name!r}; available: {sorted(available())}")


def make_train_step(
    model: nn.Module,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
):
    """Returns ``step(images, labels) -> loss`` doing one eager SGD (Nesterov momentum) step.

    The step runs the forward pass in train mode (BatchNorm batch statistics, running averages
    updated; stochastic depth active), softmax cross-entropy, the backward pass and the
    optimizer update. ``images`` is ``(N, 3, H, W)`` float32, ``labels`` ``(N,)`` int64; the
    returned loss is a detached 0-d tensor.
    """
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=learning_rate,
        momentum=momentum,
        nesterov=True,
        weight_decay=weight_decay,
    )
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
