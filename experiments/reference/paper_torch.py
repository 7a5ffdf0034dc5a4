"""A PyTorch port of the paper's released Torch code, step by step (no sdjax import).

The paper's code (github.com/yueatsprograms/Stochastic_Depth: ``main.lua``, ``ResidualDrop.lua``,
``cifar-dataset.lua``) is followed line by line; each step below cites the line it ports. Where
the port departs from it, the reason is stated. This is the reference for the question "does
sdjax, run with the paper's recipe, behave as the paper's own code does?": it shares no code and
no recipe choice with sdjax, so a choice sdjax got wrong shows as a disagreement.

Data (``cifar-dataset.lua``):

* the 50,000 training images are shuffled once (l.19-23: ``torch.randperm(50000)``) and split
  into the first 45,000 for training and the next 5,000 for validation (l.29-43); the 10,000
  test images are the test set. Pixels are floats in 0..255 (the ``.t7`` files hold bytes).
  ``--train_size N`` keeps the first N of the 45,000 (a subset for short studies; the paper: all);
* normalisation (l.47-52, called from ``main.lua`` l.38-40): the per-pixel mean image of the
  training part (``data:mean(1)``, a 3x32x32 image) is subtracted and everything divided by ONE
  number, the unbiased std of all training values (``data:std()``, taken on the raw values before
  the mean image is subtracted, as the Lua code does); validation and test use the training
  part's mean image and std;
* augmentation (l.62-83), per image and step: a translation by offsets ``xoffs, yoffs`` uniform
  in {-4, ..., 4} (``torch.random(-4,4)``), the uncovered border filled with zeros AFTER
  normalisation (i.e. with the mean image), then a horizontal flip with probability 1/2.

Model (``main.lua`` l.57-90, ``ResidualDrop.lua``), ResNet with ``6 N + 2`` layers:

* stem: 3x3 convolution 3 -> 16, stride 1, pad 1, with bias (l.62-64), BatchNorm, ReLU;
* three groups of N residual blocks at 16, 32, 64 channels; the first block of groups 2 and 3
  has stride 2 (l.67-74). Block (``ResidualDrop.lua`` l.17-27): conv 3x3 (stride s, pad 1 on
  both sides, with bias) -> BatchNorm -> ReLU -> conv 3x3 (pad 1, with bias) -> BatchNorm; the
  shortcut (l.28-39) is the identity, average-pooled 2x2 when s = 2, zero-padded in channels
  when the width grows (option A); block output = shortcut + branch, then ReLU (l.74-76);
* head: 8x8 average pooling, Linear 64 -> classes, LogSoftMax + ClassNLLCriterion (l.76-88),
  i.e. softmax cross-entropy;
* initialisation: every convolution weight He normal with fan-in and gain sqrt(2)
  (``nninit.kaiming, {gain = 'relu'}``: std = sqrt(2 / (in * 3 * 3))), bias 0 (l.63-64 and
  ``ResidualDrop.lua`` l.18-26); BatchNorm weight uniform on [0, 1) and bias 0 (Torch7's
  ``BatchNormalization:reset``; cudnn's module inherits it), momentum 0.1, eps 1e-5; Linear
  weight and bias uniform on +-1/sqrt(64) (Torch7's ``Linear:reset``, PyTorch's default too).

Stochastic depth (``main.lua`` l.92-112, l.176-182; ``ResidualDrop.lua`` l.44-71):

* block i = 1..L has death rate ``i / L * deathRate`` (l.99-107, ``lin_decay``; ``uniform``:
  ``deathRate`` for all); ``deathRate`` is p_L's complement, 0.5 in the paper;
* before every mini-batch each block's gate is closed with probability its death rate
  (l.178-182: one ``torch.rand(1)`` per block); a closed block computes only its shortcut
  (l.48-50): the branch does not run, its BatchNorm statistics are not updated and its
  parameters get a zero gradient (l.60-70);
* at evaluation every branch runs and is multiplied by ``1 - deathRate`` (l.51-53).

Optimisation (``main.lua`` l.45-55, l.153-209):

* SGD with Nesterov momentum 0.9, dampening 0, weight decay 1e-4 added to the gradient of
  EVERY parameter (``optim.sgd`` on the flattened parameters, l.46-51, l.195), including the
  parameters of closed blocks, whose gradient is zero (their momentum keeps decaying them):
  here ``zero_grad(set_to_none=False)`` keeps those zero gradients so that PyTorch's SGD, which
  skips parameters without a gradient, treats them as ``optim.sgd`` does. The momentum buffer
  starts as the first gradient in both;
* batch size 128; each epoch a new ``torch.randperm`` of the training part split into batches
  of 128, the last partial batch kept (l.174-176);
* learning rate by 1-based epoch e (l.166-172): 0.1 while ``e < 0.5 * maxEpochs``, 0.01 while
  ``e < 0.75 * maxEpochs``, then 0.001 (CIFAR-10 and CIFAR-100; SVHN's {0.6, 0.7} is not
  ported: no SVHN here);
* after every epoch the validation and test errors are measured (l.137-149, l.204-207). The
  paper reports the test error at the epoch of lowest validation error; both it and the last
  epoch's test error are recorded (ties: the earliest epoch).

Departures, each for a stated reason: the random generators are seeded with ``--seed`` (the Lua
code always uses 1, l.28-29) so that seeds can be paired and repeated; the split, batch order,
augmentation and gates use one ``torch.Generator`` (Lua: the global generator), which changes
the draws, not their distributions; runs are in float32 on ``--device`` (default CPU with
``--threads`` threads; the paper: one GPU, cudnn). Options that depart only when set:
``--eval_every N`` evaluates every N epochs and at the last (the paper: every epoch; the best
validation epoch is then the best evaluated one); ``--npz`` reads an sdjax ``.npz`` export
instead of tfds (a host without TensorFlow), and a pre-split export (``npz_export --split``)
keeps its own split, sdjax's seeded permutation, instead of ``torch.randperm``, so that both
implementations see the same examples.

One run per call; the record goes to ``<out>/<variant>_seed<seed>.json`` (a finished run is
skipped on rerun), a line per epoch to stderr::

    python -m experiments.reference.paper_torch --variant sd --seed 0 --depth 20 \\
        --epochs 2 --train_size 512 --data_dir ../shared/data/tfds --out /tmp/paper_torch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["PaperResNet", "learning_rate", "load_cifar", "main", "normalise", "translate_and_flip"]

VARIANTS = {"constant": 0.0, "sd": 0.5}
"""``deathRate`` of each variant (``main.lua`` l.20: 1 - p_L)."""
LR_DROPS = {"cifar10": (0.5, 0.75), "cifar100": (0.5, 0.75)}
"""Fractions of ``maxEpochs`` where the learning rate drops 10x (``main.lua`` l.53-55)."""
TRAIN_SIZE, VALID_SIZE = 45_000, 5_000


def load_cifar(dataset: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)``: float32 NCHW 0..255, int64."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    splits = tfds.load(
        dataset,
        split=["train", "test"],
        batch_size=-1,
        as_supervised=True,
        data_dir=data_dir,
        download=False,
    )
    out = []
    for images, labels in tfds.as_numpy(splits):
        out += [
            np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32),
            labels.astype(np.int64),
        ]
    return tuple(out)


def load_npz(path: str) -> tuple[tuple[np.ndarray, ...], tuple[int, int, int] | None]:
    """The arrays of an sdjax ``.npz`` export as :func:`load_cifar` returns them, and the file's
    ``split`` (``validation_size, split_seed, train_size``) if it is pre-split, else None.

    Read with NumPy alone: the format is four arrays (``train_images`` ``uint8 [N, H, W, C]``,
    ``train_labels``, ``test_images``, ``test_labels``) and small metadata arrays.
    """
    with np.load(path, allow_pickle=False) as f:
        arrays = []
        for part in ("train", "test"):
            images = f[f"{part}_images"].transpose(0, 3, 1, 2)
            arrays += [
                np.ascontiguousarray(images, np.float32),
                f[f"{part}_labels"].astype(np.int64),
            ]
        split = tuple(int(v) for v in f["split"]) if "split" in f else None
    return tuple(arrays), split


def split_train_valid(images, labels, generator: torch.Generator, train_size: int | None):
    """``cifar-dataset.lua`` l.19-23 and l.29-43: one shuffle, 45k train / 5k validation."""
    order = torch.randperm(len(images), generator=generator).numpy()
    images, labels = images[order], labels[order]
    train = slice(0, TRAIN_SIZE if train_size is None else train_size)
    valid = slice(TRAIN_SIZE, TRAIN_SIZE + VALID_SIZE)
    return images[train], labels[train], images[valid], labels[valid]


def normalise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``cifar-dataset.lua`` l.47-52: minus the per-pixel mean image, over one global std.

    The std is Torch's ``data:std()``: unbiased, over every value of the training part, taken
    on the values as loaded (before the mean image is subtracted).
    """
    mean = train.astype(np.float64).mean(axis=0)
    std = train.astype(np.float64).std(ddof=1)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def translate_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``cifar-dataset.lua`` l.62-83 for a batch ``[B, C, H, W]``: shift by up to 4, zero fill, flip.

    Output pixel (y, x) is input pixel (y - yoffs, x - xoffs), zero where that is outside, with
    ``xoffs, yoffs`` uniform in {-4, ..., 4}; then a horizontal flip with probability 1/2.
    """
    batch, _, height, width = images.shape
    offsets = torch.randint(-4, 5, (batch, 2), generator=generator)
    flips = torch.randint(1, 3, (batch,), generator=generator) == 1
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    out = torch.empty_like(images)
    for i in range(batch):
        yoffs, xoffs = int(offsets[i, 0]), int(offsets[i, 1])
        window = padded[i, :, 4 - yoffs : 4 - yoffs + height, 4 - xoffs : 4 - xoffs + width]
        out[i] = torch.flip(window, dims=(2,)) if flips[i] else window
    return out


def _kaiming_conv(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=True)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (in_channels * 9)))
    nn.init.zeros_(conv.bias)
    return conv


def _torch7_batch_norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    nn.init.uniform_(norm.weight, 0.0, 1.0)
    nn.init.zeros_(norm.bias)
    return norm


class ResidualDrop(nn.Module):
    """``ResidualDrop.lua``: a residual block with a gate (train) and ``1 - deathRate`` (eval)."""

    def __init__(self, death_rate: float, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.death_rate, self.gate = death_rate, True
        self.branch = nn.Sequential(
            _kaiming_conv(in_channels, out_channels, stride),
            _torch7_batch_norm(out_channels),
            nn.ReLU(),
            _kaiming_conv(out_channels, out_channels, 1),
            _torch7_batch_norm(out_channels),
        )
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = nn.functional.avg_pool2d(x, self.stride, self.stride)
        if self.extra_channels > 0:
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x)
        if self.training:
            if self.gate:
                out = out + self.branch(x)
        else:
            out = out + self.branch(x) * (1.0 - self.death_rate)
        return torch.relu(out)  # addResidualDrop's ReLU after the block


class PaperResNet(nn.Module):
    """``main.lua`` l.57-90: the CIFAR ResNet with ``6 N + 2`` layers, ``N = (depth - 2) / 6``."""

    def __init__(self, depth: int, num_classes: int, death_rate: float, death_mode: str):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth={depth}: allowed 6 N + 2 (20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_kaiming_conv(3, 16, 1), _torch7_batch_norm(16), nn.ReLU())
        shapes = [(16, 16, 1)] * n + [(16, 32, 2)] + [(32, 32, 1)] * (n - 1)
        shapes += [(32, 64, 2)] + [(64, 64, 1)] * (n - 1)
        blocks = len(shapes)
        rates = [
            death_rate if death_mode == "uniform" else (i + 1) / blocks * death_rate
            for i in range(blocks)
        ]
        self.blocks = nn.ModuleList(
            ResidualDrop(r, c_in, c_out, s)
            for r, (c_in, c_out, s) in zip(rates, shapes, strict=True)
        )
        self.head = nn.Linear(64, num_classes)
        bound = 1.0 / math.sqrt(64)
        nn.init.uniform_(self.head.weight, -bound, bound)
        nn.init.uniform_(self.head.bias, -bound, bound)

    def draw_gates(self, generator: torch.Generator) -> int:
        """``main.lua`` l.178-182: one uniform draw per block; returns the open gates' count."""
        for block in self.blocks:
            block.gate = not bool(torch.rand(1, generator=generator)[0] < block.death_rate)
        return sum(block.gate for block in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def learning_rate(epoch: int, max_epochs: int, drops: tuple[float, float]) -> float:
    """``main.lua`` l.166-172, ``epoch`` 1-based."""
    if epoch < max_epochs * drops[0]:
        return 0.1
    if epoch < max_epochs * drops[1]:
        return 0.01
    return 0.001


@torch.no_grad()
def error_rate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int, device: str = "cpu"
) -> float:
    """``main.lua`` l.115-132: top-1 error in evaluation mode, all gates open."""
    model.eval()
    wrong = 0
    for start in range(0, len(images), batch):
        logits = model(torch.from_numpy(images[start : start + batch]).to(device))
        wrong += int((logits.argmax(1).cpu().numpy() != labels[start : start + batch]).sum())
    return wrong / len(images)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    split = None
    if args.npz:
        (train_x, train_y, test_x, test_y), split = load_npz(args.npz)
    else:
        train_x, train_y, test_x, test_y = load_cifar(args.dataset, args.data_dir)
    if split is None:
        train_x, train_y, valid_x, valid_y = split_train_valid(
            train_x, train_y, generator, args.train_size
        )
    else:  # the file's split (sdjax's), kept as it is: the last validation_size validate
        n = len(train_y) - split[0]
        if args.train_size not in (None, n):
            raise ValueError(f"--train_size={args.train_size}: the pre-split --npz holds {n}")
        train_x, train_y, valid_x, valid_y = train_x[:n], train_y[:n], train_x[n:], train_y[n:]
    train_x, valid_x, test_x = normalise(train_x, valid_x, test_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    model = PaperResNet(args.depth, num_classes, VARIANTS[args.variant], args.death_mode)
    model.to(args.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, dampening=0, nesterov=True, weight_decay=1e-4
    )
    loss_fn = nn.CrossEntropyLoss()
    epochs, start = [], time.time()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, args.epochs, LR_DROPS[args.dataset])
        order = torch.randperm(len(train_x), generator=generator)
        losses, open_gates = [], []
        for batch in order.split(args.batch_size):
            model.train()
            open_gates.append(model.draw_gates(generator))
            inputs = translate_and_flip(torch.from_numpy(train_x[batch.numpy()]), generator)
            targets = torch.from_numpy(train_y[batch.numpy()])
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(model(inputs.to(args.device)), targets.to(args.device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        record = {
            "epoch": epoch,
            "learning_rate": optimizer.param_groups[0]["lr"],
            "train_loss": float(np.mean(losses)),
            "blocks_run": float(np.mean(open_gates)),
            "train_time_s": time.time() - epoch_start,
        }
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            record["valid_error"] = error_rate(
                model, valid_x, valid_y, args.batch_size, args.device
            )
            record["test_error"] = error_rate(model, test_x, test_y, args.batch_size, args.device)
        epochs.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
    evaluated = [r for r in epochs if "valid_error" in r]
    best = min(evaluated, key=lambda r: (r["valid_error"], r["epoch"]))
    return {
        "variant": args.variant,
        "seed": args.seed,
        "dataset": args.dataset,
        "depth": args.depth,
        "epochs": args.epochs,
        "train_size": len(train_x),
        "valid_size": len(valid_x),
        "split": "npz file's" if split is not None else "torch.randperm (cifar-dataset.lua)",
        "eval_every": args.eval_every,
        "device": args.device,
        "death_rate": VARIANTS[args.variant],
        "death_mode": args.death_mode,
        "test_error": epochs[-1]["test_error"],
        "best_valid_epoch": best["epoch"],
        "test_error_at_best_valid": best["test_error"],
        "total_time_s": time.time() - start,
        "median_epoch_time_s": float(np.median([r["train_time_s"] for r in epochs])),
        "per_epoch": epochs,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dataset", choices=sorted(LR_DROPS), default="cifar10")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--death_mode", choices=("lin_decay", "uniform"), default="lin_decay")
    parser.add_argument("--train_size", type=int, default=None, help="first N of the 45k")
    parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--eval_every", type=int, default=1, help="evaluate every N epochs and at the last"
    )
    parser.add_argument("--npz", default=None, help="an sdjax .npz export instead of tfds")
    parser.add_argument("--out", required=True, help="folder of the per-run records")
    args = parser.parse_args(argv)
    if args.train_size is not None and not 0 < args.train_size <= TRAIN_SIZE:
        parser.error(f"--train_size={args.train_size}: allowed 1 ... {TRAIN_SIZE}")
    if args.eval_every < 1:
        parser.error(f"--eval_every={args.eval_every}: allowed an integer >= 1")
    path = os.path.join(args.out, f"{args.variant}_seed{args.seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = train(args)
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


if __name__ == "__main__":
    main()
