"""Independent PyTorch reference trainer: sdjax's digits recipe, re-implemented outside sdjax.

Trains the CIFAR ResNet of `experiments/torch_models.py` (the paper's batch-wise skip, option-A
shortcut with pooling) with the recipe that `configs/digits_sd.py` makes sdjax apply, written
from scratch in PyTorch (no sdjax import), so that a defect in sdjax's stochastic depth would show
as a disagreement between the two frameworks:

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

Known difference: PyTorch's BatchNorm stores the unbiased batch variance in its running average,
Flax the biased one (a factor n / (n - 1), n >= 256 values per channel here).

One run per call; the result goes to `<out>/<variant>_seed<seed>.json` (a finished run is skipped
on rerun):

    OMP_NUM_THREADS=1 python -m experiments.reference_torch --variant sd --seed 0 \\
        --depth 32 --epochs 15 --out workdirs/fidelity_reference/torch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time
from typing import Any

import numpy as np

VARIANTS = {"constant": 0.0, "sd": 0.5}


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
    batch_size: int = 64,
    final_rate: float | None = None,
    same_padding: bool = True,
) -> dict[str, Any]:
    """Trains one run on digits and returns its result dict (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from experiments import torch_models

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rate = VARIANTS[variant] if final_rate is None else final_rate
    (x_tr, y_tr), (x_te, y_te) = digits_split()
    pixels = x_tr.transpose(0, 2, 3, 1).reshape(-1, x_tr.shape[1]).astype(np.float64)
    mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1e-6)
    x_tr, x_te = normalize(x_tr, mean, std), normalize(x_te, mean, std)
    n = len(y_tr)
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch
    num_blocks = 3 * ((depth - 2) // 6)
    model = torch_models.CifarResNet(
        depth,
        linear_rates(num_blocks, rate) if rate > 0 else None,
        drop_mode="batch",
        scale_by_keep=False,
        num_classes=10,
        input_channels=1,
        same_padding=same_padding,
    )
    init_like_sdjax(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    crop_rng = np.random.default_rng([seed, 7919])
    model.train()
    epoch_losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        losses = []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * batch_size : (i + 1) * batch_size]
            images = torch.from_numpy(random_crop(x_tr[idx], crop_rng, 1))
            labels = torch.from_numpy(y_tr[idx])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses)))
    train_time = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_te))
    accuracy = float((logits.argmax(1).numpy() == y_te).mean())
    runs = sum(b.residual.branches_run for b in model.blocks)
    seen = sum(b.residual.branches_seen for b in model.blocks)
    return {
        "framework": "torch",
        "variant": variant,
        "seed": seed,
        "depth": depth,
        "epochs": epochs,
        "final_drop_rate": rate,
        "same_padding": same_padding,
        "steps": total_steps,
        "test_error": 1.0 - accuracy,
        "final_train_loss": epoch_losses[-1],
        "train_loss_per_epoch": epoch_losses,
        "train_time_s": train_time,
        "kept_block_fraction": runs / seen if seen else 1.0,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", required=True, help="folder of the per-run result files")
    parser.add_argument(
        "--symmetric_padding", action="store_true", help="stride-2 convs pad 1 on both sides"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = pathlib.Path(args.out) / f"{args.variant}_seed{args.seed}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = train(
        args.variant, args.seed, args.depth, args.epochs, same_padding=not args.symmetric_padding
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(path)
    print(json.dumps({k: v for k, v in result.items() if k != "train_loss_per_epoch"}))
    return result


if __name__ == "__main__":
    main()
