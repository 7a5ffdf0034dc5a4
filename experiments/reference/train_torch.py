"""Independent PyTorch reference trainer: sdjax's digits and CIFAR-10 recipes, outside sdjax.

Trains the CIFAR ResNet of `experiments/reference/torch_models.py` (the paper's batch-wise skip, option-A
shortcut with pooling) with the recipe that `configs/digits_sd.py` (`--dataset digits`, the
default) or `configs/cifar10_sd.py` (`--dataset cifar10`) makes sdjax apply, written from scratch
in PyTorch (no sdjax import), so that a defect in sdjax's stochastic depth would show as a
disagreement between the two frameworks.

Digits (`configs/digits_sd.py`):

* data: scikit-learn digits (8x8x1, values 0..16), stratified split `train_test_split(test_size=360,
  stratify=labels, random_state=0)` -> 1,437 train / 360 test; per-channel normalisation with the
  training mean and (population) std; training augmentation: zero-pad 1 pixel (after
  normalisation) and crop back to 8x8 at offsets uniform in {0, 1, 2} per image; no flips;
* data order: epoch e reads `default_rng([seed, e]).permutation(1437)` in batches of 64, the last
  `1437 % 64` examples of each epoch unused (22 steps per epoch), as sdjax's pipeline;
* model: stride-2 convolutions padded as XLA's "SAME" (0 before, 1 after on even sizes, as
  sdjax; `--symmetric_padding` for PyTorch's / the paper's Torch code's 1 on both sides); conv
  kernels He normal with fan-out, BatchNorm scale 1 / bias 0 (momentum 0.1 in Torch's
  convention = 0.9 in Flax's, eps 1e-5), the classifier as Flax's `nn.Dense` (LeCun truncated
  normal kernel, zero bias); drop rate of block l = 1..L is `final_rate * l / L`, one host-side
  draw per block and step, a dropped branch is not run (its BatchNorm statistics not updated);
  at evaluation the branch is multiplied by `1 - rate` (`scale_by_keep=False`);
* optimizer: SGD, Nesterov momentum 0.9, L2 weight decay 1e-4 on every parameter (added to the
  gradient before momentum); learning rate 0.1 with a linear warm-up from 0 over the first epoch
  (`lr(s) = 0.1 * s / 22` for `s < 22`), then divided by 10 at 50% and 75% of the steps
  (boundary `int(fraction * total_steps)`), indexed by the 0-based step as optax does;
* loss: mean softmax cross-entropy; evaluation of the test set after the last epoch with the
  running BatchNorm averages.

CIFAR-10 (`configs/cifar10_sd.py`, as `python -m sdjax.main --config=configs/cifar10_sd.py
--config.input.train_split=train[:N] ...` runs it): everything as digits except

* data: tfds `cifar10` read with `tfds.load(..., batch_size=-1, download=False)` from
  `--data_dir` (else `$TFDS_DATA_DIR`, else the tfds default), the split `train[:N]` for
  `--train_size N` (the first N stored records, as sdjax's `input.train_split=train[:N]`; the full
  `train` without the flag) and the 10,000-image `test` split; uint8 32x32x3 images; per-channel
  mean and population std of the training subset's pixels (float64, std floored at 1e-6),
  applied in float32 as `(x - mean) / std`; training augmentation after normalisation: zero-pad
  4 pixels and crop back to 32x32 at offsets uniform in {0, ..., 8} per image, then a horizontal
  flip with probability 1/2 per image;
* data order: epoch e reads `default_rng([seed, e]).permutation(N)` in batches of 128, the last
  `N % 128` examples of each epoch unused (sdjax drops the remainder): `N // 128` steps per
  epoch (8 for N = 1,024), `round(epochs * steps_per_epoch)` steps in all;
* model: 3 input channels (stages at 32x32, 16x16, 8x8), otherwise as digits;
* optimizer: as digits but without warm-up (`configs/cifar10_sd.py` keeps `default_config`'s
  `warmup_epochs = 0`, `warmup_steps = 0`): lr 0.1 from step 0, /10 at `int(0.5 * T)` and
  `int(0.75 * T)`; no label smoothing (`optim.label_smoothing = 0`), no EMA;
* evaluation: the full test split after the last epoch, in batches of 500 (sdjax's
  `train.eval_batch_size`; batch size is immaterial with running averages).

Known differences to sdjax (both datasets):

* random numbers: augmentation offsets/flips come from NumPy (`default_rng([seed, 7919])`),
  drop gates and initial weights from torch's generator (`torch.manual_seed(seed)`); sdjax draws
  them from JAX threefry keys. Same distributions, different draws: the comparison is
  statistical, over seeds. The example order of every epoch IS the same as sdjax's for the same
  seed (same permutation function), and so are the data and normalisation statistics;
* PyTorch's BatchNorm stores the unbiased batch variance in its running average, Flax the biased
  one (a factor n / (n - 1); n >= 256 values per channel on digits, >= 8,192 on CIFAR-10);
* floating point: oneDNN / ATen kernels vs XLA:CPU (summation orders), float32 throughout;
* sdjax's `final_train_loss` is the mean loss of the steps since its last metrics flush (every
  50 steps and at epoch ends: the last epoch's steps unless a multiple of 50 falls inside it);
  here it is always the mean over the last epoch's steps.

One run per call; the result goes to `<out>/<variant>_seed<seed>.json` (a finished run is skipped
on rerun); the per-epoch train loss and wall time are printed to stderr:

    OMP_NUM_THREADS=1 python -m experiments.reference.train_torch --variant sd --seed 0 \\
        --depth 32 --epochs 15 --out workdirs/fidelity_reference/torch
    OMP_NUM_THREADS=1 taskset -c 1 python -m experiments.reference.train_torch --dataset cifar10 \\
        --train_size 1024 --data_dir ../shared/data/tfds --variant sd --seed 0 --depth 20 \\
        --epochs 20 \\
        --out experiments/reference/results/cifar10/resnet20_n1024_ep20/torch_runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

import numpy as np

VARIANTS = {"constant": 0.0, "sd": 0.5}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What differs between the digits and CIFAR-10 recipes (see the module docstring)."""

    batch_size: int
    crop_padding: int
    flip: bool
    warmup_epochs: float
    input_channels: int
    eval_batch_size: int


RECIPES = {
    "digits": Recipe(batch_size=64, crop_padding=1, flip=False, warmup_epochs=1.0,
                     input_channels=1, eval_batch_size=360),
    "cifar10": Recipe(batch_size=128, crop_padding=4, flip=True, warmup_epochs=0.0,
                      input_channels=3, eval_batch_size=500),
}  # fmt: skip


def linear_rates(num_blocks: int, final_rate: float) -> list[float]:
    """The paper's linear decay: block l = 1..L drops with probability `final_rate * l / L`."""
    return [final_rate * layer / num_blocks for layer in range(1, num_blocks + 1)]


def learning_rate(
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    base: float = 0.1,
    warmup_epochs: float = 1.0,
    boundaries: tuple[float, ...] = (0.5, 0.75),
    decay_factor: float = 0.1,
) -> float:
    """The learning rate used by the (0-based) `step`: linear warm-up from 0, then step decay.

    Warm-up length `round(warmup_epochs * steps_per_epoch)` steps; during it `base * step / warm`.
    After it, `base * decay_factor ** k` with k the number of boundaries `int(b * total_steps)`
    that are <= `step`.
    """
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return base * step / warm
    k = sum(1 for b in boundaries if step >= int(b * total_steps))
    return base * decay_factor**k


def digits_split(test_size: int = 360, split_seed: int = 0):
    """((x_train, y_train), (x_test, y_test)): float32 NCHW images in [0, 16], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=split_seed
    )
    return (x_tr, y_tr), (x_te, y_te)


def cifar10_split(
    train_size: int | None = None, data_dir: str | None = None, test_split: str = "test"
):
    """((x_train, y_train), (x_test, y_test)) of tfds cifar10: uint8 NCHW images, int64 labels.

    `train_size` N reads `train[:N]` (None: `train`); `data_dir` None -> `$TFDS_DATA_DIR` -> the
    tfds default. Records in stored order (`shuffle_files=False`), as sdjax reads them.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    train_split = "train" if train_size is None else f"train[:{int(train_size)}]"

    def read(split):
        data = tfds.as_numpy(
            tfds.load(
                "cifar10",
                split=split,
                data_dir=data_dir,
                batch_size=-1,
                shuffle_files=False,
                download=False,
            )
        )
        images = np.ascontiguousarray(data["image"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
        return images, data["label"].astype(np.int64)

    return read(train_split), read(test_split)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (floored at 1e-6) of NCHW images, in float64."""
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, images.shape[1]).astype(np.float64)
    return pixels.mean(0), np.maximum(pixels.std(0), 1e-6)


def schedule_lengths(num_train: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps): `num_train // batch_size` (remainder dropped) and
    `max(round(epochs * steps_per_epoch), 1)`."""
    steps_per_epoch = num_train // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({num_train})")
    return steps_per_epoch, max(int(round(epochs * steps_per_epoch)), 1)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`(images - mean) / std` per channel of NCHW float images; float32."""
    return ((images - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Zero-pads NCHW images by `padding` and crops back at offsets uniform in [0, 2 * padding]."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    return np.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips each NCHW image left-right with probability 1/2 (one draw per image)."""
    flip = rng.random(len(images)) < 0.5
    return np.where(flip[:, None, None, None], images[..., ::-1], images)


def init_like_sdjax(model: Any) -> None:
    """Conv: He normal fan-out; BatchNorm: 1 / 0; Linear: Flax's LeCun truncated normal, bias 0."""
    import torch
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # Flax variance_scaling(1, fan_in, truncated_normal): std corrected for the truncation.
            std = math.sqrt(1.0 / module.in_features) / 0.87962566103423978
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            with torch.no_grad():
                module.bias.zero_()


def train(
    variant: str,
    seed: int,
    depth: int = 32,
    epochs: int = 15,
    batch_size: int | None = None,
    final_rate: float | None = None,
    same_padding: bool = True,
    dataset: str = "digits",
    train_size: int | None = None,
    data_dir: str | None = None,
    test_split: str = "test",
) -> dict[str, Any]:
    """Trains one run and returns its result dict (see the module docstring).

    `batch_size` None takes the dataset's recipe (64 digits, 128 CIFAR-10); `train_size`,
    `data_dir` and `test_split` apply to CIFAR-10 only.
    """
    import torch
    import torch.nn.functional as F

    from experiments.reference import torch_models

    if dataset not in RECIPES:
        raise ValueError(f"dataset must be one of {sorted(RECIPES)}, got {dataset!r}")
    recipe = RECIPES[dataset]
    batch_size = recipe.batch_size if batch_size is None else batch_size
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rate = VARIANTS[variant] if final_rate is None else final_rate
    extra: dict[str, Any] = {}
    if dataset == "digits":
        if train_size is not None:
            raise ValueError("--train_size applies to cifar10 only (digits: 1,437 train images)")
        (x_tr, y_tr), (x_te, y_te) = digits_split()
        mean, std = channel_stats(x_tr)
    else:
        (x_tr, y_tr), (x_te, y_te) = cifar10_split(train_size, data_dir, test_split)
        # float32 statistics: sdjax normalises in float32 (`(x - mean) / std`, uint8 -> float32).
        mean, std = (a.astype(np.float32) for a in channel_stats(x_tr))
        extra = {
            "train_split": "train" if train_size is None else f"train[:{int(train_size)}]",
            "test_split": test_split,
            "data_dir": data_dir or os.environ.get("TFDS_DATA_DIR"),
            "normalization_mean": mean.tolist(),
            "normalization_std": std.tolist(),
        }
    x_tr, x_te = normalize(x_tr, mean, std), normalize(x_te, mean, std)
    n = len(y_tr)
    steps_per_epoch, total_steps = schedule_lengths(n, batch_size, epochs)
    num_blocks = 3 * ((depth - 2) // 6)
    model = torch_models.CifarResNet(
        depth,
        linear_rates(num_blocks, rate) if rate > 0 else None,
        drop_mode="batch",
        scale_by_keep=False,
        num_classes=10,
        input_channels=recipe.input_channels,
        same_padding=same_padding,
    )
    init_like_sdjax(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    augment_rng = np.random.default_rng([seed, 7919])
    model.train()
    epoch_losses, epoch_times, losses = [], [], []
    start = epoch_start = time.perf_counter()
    order = None
    for step in range(total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[i * batch_size : (i + 1) * batch_size]
        batch = random_crop(x_tr[idx], augment_rng, recipe.crop_padding)
        if recipe.flip:
            batch = random_flip(batch, augment_rng)
        images = torch.from_numpy(np.ascontiguousarray(batch))
        labels = torch.from_numpy(y_tr[idx])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, total_steps, steps_per_epoch, warmup_epochs=recipe.warmup_epochs
            )
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if i == steps_per_epoch - 1 or step == total_steps - 1:
            now = time.perf_counter()
            epoch_losses.append(float(np.mean(losses)))
            epoch_times.append(now - epoch_start)
            print(
                f"epoch {len(epoch_losses)}: train loss {epoch_losses[-1]:.4f}, "
                f"{epoch_times[-1]:.2f} s ({len(losses)} steps)",
                file=sys.stderr,
                flush=True,
            )
            losses, epoch_start = [], now
    train_time = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(y_te), recipe.eval_batch_size):
            logits = model(torch.from_numpy(x_te[lo : lo + recipe.eval_batch_size]))
            correct += int(
                (logits.argmax(1).numpy() == y_te[lo : lo + recipe.eval_batch_size]).sum()
            )
    accuracy = correct / len(y_te)
    eval_time = time.perf_counter() - start - train_time
    print(f"test error {1 - accuracy:.4f}, eval {eval_time:.2f} s", file=sys.stderr, flush=True)
    runs = sum(b.residual.branches_run for b in model.blocks)
    seen = sum(b.residual.branches_seen for b in model.blocks)
    return {
        "framework": "torch",
        "dataset": dataset,
        "variant": variant,
        "seed": seed,
        "depth": depth,
        "epochs": epochs,
        "final_drop_rate": rate,
        "same_padding": same_padding,
        "train_size": n,
        "test_size": len(y_te),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "steps": total_steps,
        "test_error": 1.0 - accuracy,
        "final_train_loss": epoch_losses[-1],
        "train_loss_per_epoch": epoch_losses,
        "train_time_s": train_time,
        "epoch_time_s": epoch_times,
        "eval_time_s": eval_time,
        "kept_block_fraction": runs / seen if seen else 1.0,
        **extra,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dataset", choices=sorted(RECIPES), default="digits")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--train_size", type=int, default=None, help="cifar10: train on train[:N] (default: all)"
    )
    parser.add_argument(
        "--data_dir", default=None, help="cifar10: tfds data dir (default: $TFDS_DATA_DIR)"
    )
    parser.add_argument("--test_split", default="test", help="cifar10: tfds test split")
    parser.add_argument("--out", required=True, help="folder of the per-run result files")
    parser.add_argument(
        "--symmetric_padding", action="store_true", help="stride-2 convs pad 1 on both sides"
    )
    args = parser.parse_args(argv)
    if args.dataset == "digits" and (
        args.train_size is not None or args.data_dir is not None or args.test_split != "test"
    ):
        parser.error("--train_size, --data_dir and --test_split apply to --dataset cifar10 only")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = pathlib.Path(args.out) / f"{args.variant}_seed{args.seed}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = train(
        args.variant,
        args.seed,
        args.depth,
        args.epochs,
        same_padding=not args.symmetric_padding,
        dataset=args.dataset,
        train_size=args.train_size,
        data_dir=args.data_dir,
        test_split=args.test_split,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)
    print(json.dumps({k: v for k, v in result.items() if k != "train_loss_per_epoch"}))
    return result


if __name__ == "__main__":
    main()
