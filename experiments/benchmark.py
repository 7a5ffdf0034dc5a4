"""Train-step benchmark: compile time and step time of sdjax models, with stochastic depth, vs PyTorch.

One process, one run, every figure side by side. For each model and setting it builds the sdjax
model (`sdjax.models.create`), jit-compiles one full training step (forward in train mode,
softmax cross-entropy, backward, SGD with Nesterov momentum and weight decay, BatchNorm statistics
update), times `lower` + `compile`, then times ``--steps`` steps after ``--warmup`` untimed ones
(`jax.block_until_ready` on the loss and the new state after every step). When torch is
importable (the ``bench`` extra) the same network written in PyTorch eager
(`experiments/torch_models.py`) is timed right after, in the same process, on the same synthetic
batch, with the same optimizer.

Settings (``--settings``; extra rows for single models with ``--extra MODEL:SETTING``):

* ``constant``: constant depth (``final_drop_rate=0``).
* ``row``: stochastic depth, per-sample mask (``drop_mode="row"``), ``--drop_schedule`` decay to
  ``--final_drop_rate`` (default: linear to 0.5). PyTorch peer: timm-style DropPath.
* ``batch``: stochastic depth, one gate per block and step, dropped branches not computed
  (``drop_mode="batch"``). PyTorch peer: the paper's ``if rand < drop: skip`` in Python.
* modifiers appended with ``+``: ``+xla`` (stock XLA convolution, ``conv_impl="xla"``),
  ``+fast`` (``conv_impl="fast"``), ``+scan`` (``scan_blocks=True``), ``+dp`` (data-parallel:
  the batch is sharded over all ``jax.devices()``, parameters replicated, as the trainer does;
  on CPU the device count is ``--cpu_devices``). E.g. ``constant+scan+dp``. Rows with modifiers
  are JAX-only; their PyTorch ratio uses the peer of the base setting. Ratios between settings
  (batch / constant, row overhead) are taken within one modifier group, e.g. ``batch+scan+dp``
  over ``constant+scan+dp``.

CPU devices: ``--cpu_devices N`` (default: the number of CPU cores available to the process)
splits the CPU backend into N devices before JAX initializes (``jax_num_cpu_devices``). Rows
without ``+dp`` run on device 0 only; ``+dp`` rows use all of them. Caveat, measured: in a
process with N > 1 CPU devices XLA:CPU ran a single-device step slower than in a one-device
process (ResNet-56, scanned, 2 cores: 2.2 s vs 1.7 s, with ``--host_malloc system``; within
run-to-run noise with the default ``auto``), so for one-device figures use
``--cpu_devices 1`` (the ``+dp`` rows then equal their plain ones). On GPU/TPU the flag has no
effect on the timed devices.

Host allocator: ``--host_malloc`` (default ``auto``) applies `sdjax.host_malloc` to the process,
as the trainer does: on CPU, glibc keeps freed memory so that XLA:CPU's per-step buffers are not
page-faulted afresh every step (ResNet-56, 2 devices: 221k faults and ~0.5 s of system CPU time
per step without it, none with it; -26% step time). It applies to the PyTorch rows too (they
run in the same process); ``--host_malloc system`` keeps glibc's defaults for both. The median
page faults and system CPU time per sdjax step are recorded for every row.

Randomness: the step key is ``fold_in(key(--seed, impl=--prng_impl), step_index)`` for step indices
``0 .. warmup + steps - 1``, identical for every model and setting, so batch-mode runs see the same
gate sequence run after run; PyTorch reseeds its generator the same way before each run. Batch-mode
step times vary from step to step (the number of computed blocks is random), hence both median and
mean are reported.

Ideal batch-mode ratio: the expected fraction of compute kept. With per-block drop rates ``r_l``
and per-block multiply-accumulate counts ``w_l`` (counted analytically from the architecture: all
convolutions and dense layers of the block's residual branch at the benchmark resolution),
``ideal (blocks) = sum_l w_l (1 - r_l) / sum_l w_l``. ``ideal (step)`` adds the never-dropped
compute (stem, head, blocks without an identity skip) to both sums, assuming backward cost is
proportional to forward cost and ignoring elementwise work and the optimizer update. For CIFAR
ResNets the blocks of a stage have equal cost and the first block of stages 2 and 3 (stride 2)
costs 3/4 of the others.

Realized kept compute: the same MAC-weighted fraction for the gates the timed steps actually drew
(sdjax: recomputed from each step key with `sdjax.models.batch_gates`, no forward pass; PyTorch:
how often each block ran), averaged over the timed steps. With 10-20 steps it can be several
points from the ideal (ResNet-110: about 3 blocks' worth of standard deviation per step), which
moves the batch/constant ratio by as much; compare the measured ratio with it to tell gate luck
from overhead.

Usage (from the repository root)::

    python -m experiments.benchmark                 # full run, ~25 min on 2 cores
    python -m experiments.benchmark --quick         # cifar_resnet20, batch 16, 3 steps (seconds)
    python -m experiments.benchmark --models cifar_resnet56 --settings constant,batch --no_torch

Writes ``<out_dir>/benchmark.json`` and ``<out_dir>/benchmark.md`` (default
``experiments/results/``), both with the exact command, versions and machine. The targets of
issue 5 are evaluated in the markdown as met / missed. This is a measurement script, not a test:
nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` and `sdjax` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import common
from sdjax import host_malloc, models, schedules, train

try:  # the `bench` extra
    import torch

    from experiments import torch_models

    TORCH_IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the environment
    torch = None
    torch_models = None
    TORCH_IMPORT_ERROR = f"{type(error).__name__}: {error}"

BASE_SETTINGS = ("constant", "row", "batch")
MODIFIERS = {
    "xla": {"conv_impl": "xla"},
    "fast": {"conv_impl": "fast"},
    "scan": {"scan_blocks": True},
}
DATA_PARALLEL = "dp"  # the runtime modifier: shard the batch over all devices
DEFAULT_EXTRA = (  # unrolled blocks and the stock XLA convolution, for comparison
    "cifar_resnet56:constant",
    "cifar_resnet56:constant+xla",
    "cifar_resnet110:constant",
)
DEFAULT_SETTINGS = (
    "constant+scan",
    "row+scan",
    "batch+scan",
    "constant+scan+dp",
    "row+scan+dp",
    "batch+scan+dp",
)
CIFAR_CHANNELS = (16, 32, 64)
NUM_CLASSES = 10
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

# EfficientNet-B0 stages: (expand_ratio, kernel_size, stride, out_channels, repeats), for the
# analytic per-block compute of the ideal ratio (same table as the architecture itself).
EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# Issue 5 targets.
TARGET_BATCH_RATIO = 0.80
TARGET_ROW_OVERHEAD = 0.05
TARGET_TORCH_RATIO = 1.0
TARGET_COMPILE_S = {"cifar_resnet110": 20.0, "cifar_resnet1202": 60.0}


# ---------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named benchmark setting: the base stochastic-depth mode plus model-field modifiers."""

    name: str
    base: str
    overrides: dict[str, Any]
    data_parallel: bool = False

    @property
    def variant(self) -> str:
        """The modifiers of the name, e.g. ``"+scan+dp"`` (``""`` for a base setting)."""
        return self.name[len(self.base) :]


def parse_setting(name: str, final_drop_rate: float, drop_schedule: str) -> Setting:
    """``"batch+scan+dp"`` -> Setting(base="batch", overrides={...}, data_parallel=True).

    Raises:
      ValueError: an unknown base or modifier (the message lists the allowed ones).
    """
    base, *mods = name.split("+")
    if base not in BASE_SETTINGS:
        raise ValueError(f"setting {name!r}: base must be one of {BASE_SETTINGS}, got {base!r}")
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


@dataclasses.dataclass(frozen=True)
class Workload:
    """Input shape of one model: a synthetic batch of ``batch_size`` NHWC images."""

    batch_size: int
    image_size: int


def workload(name: str, args: argparse.Namespace) -> Workload:
    if name.startswith("efficientnet"):
        return Workload(args.efficientnet_batch_size, args.efficientnet_image_size)
    return Workload(args.batch_size, args.image_size)


def synthetic_batch(wl: Workload, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal float32 images ``(N, H, W, 3)`` and int32 labels in ``[0, NUM_CLASSES)``."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((wl.batch_size, wl.image_size, wl.image_size, 3), np.float32)
    labels = rng.integers(0, NUM_CLASSES, (wl.batch_size,), dtype=np.int32)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Per-block compute and drop rates (for the ideal ratio and the PyTorch peer).
# ---------------------------------------------------------------------------------------------


def cifar_resnet_macs(depth: int, image_size: int) -> tuple[list[float], float]:
    """Multiply-accumulates per residual block, and of the rest (stem + classifier), per image."""
    blocks_per_stage = (depth - 2) // 6
    block_macs = []
    size = image_size
    in_channels = CIFAR_CHANNELS[0]
    for stage, channels in enumerate(CIFAR_CHANNELS):
        for index in range(blocks_per_stage):
            if stage > 0 and index == 0:
                size = -(-size // 2)
            first = size * size * 9 * in_channels * channels
            second = size * size * 9 * channels * channels
            block_macs.append(float(first + second))
            in_channels = channels
    other = image_size * image_size * 9 * 3 * CIFAR_CHANNELS[0] + CIFAR_CHANNELS[-1] * NUM_CLASSES
    return block_macs, float(other)


def efficientnet_b0_macs(image_size: int) -> tuple[list[float], list[bool], float]:
    """MACs per MBConv block, whether it has an identity skip, and the MACs of the rest."""
    size = -(-image_size // 2)
    other = size * size * 9 * 3 * 32
    in_channels = 32
    block_macs, has_skip = [], []
    for expand_ratio, kernel, stride, channels, repeats in EFFICIENTNET_B0_STAGES:
        for index in range(repeats):
            block_stride = stride if index == 0 else 1
            hidden = in_channels * expand_ratio
            macs = size * size * in_channels * hidden if expand_ratio != 1 else 0
            size = -(-size // block_stride)
            squeeze = max(1, int(in_channels * 0.25))
            macs += size * size * kernel * kernel * hidden  # depthwise
            macs += 2 * hidden * squeeze  # squeeze-excite
            macs += size * size * hidden * channels  # projection
            block_macs.append(float(macs))
            has_skip.append(block_stride == 1 and in_channels == channels)
            in_channels = channels
    other += size * size * in_channels * 1280 + 1280 * NUM_CLASSES
    return block_macs, has_skip, float(other)


def block_compute(name: str, image_size: int) -> tuple[list[float], list[bool], float] | None:
    """(MACs per block, droppable per block, other MACs), or None for an unknown architecture."""
    if name.startswith("cifar_resnet"):
        depth = int(name.removeprefix("cifar_resnet"))
        block_macs, other = cifar_resnet_macs(depth, image_size)
        return block_macs, [True] * len(block_macs), other
    if name == "efficientnet_b0":
        return efficientnet_b0_macs(image_size)
    return None


def block_drop_rates(model: Any) -> list[float] | None:
    """Per-block drop rates of the sdjax model (its schedule applied to its final rate), in
    forward order over all its blocks, or None if the model does not say how many blocks it has.
    EfficientNet ignores the rates of its blocks without an identity shortcut."""
    if not hasattr(model, "num_blocks"):
        return None
    return [float(r) for r in model.block_rates(model.num_blocks)]


def ideal_ratios(name: str, image_size: int, rates: Sequence[float]) -> dict[str, float] | None:
    """Expected fraction of compute kept in batch mode: over the blocks, and over the step."""
    compute = block_compute(name, image_size)
    if compute is None:
        return None
    block_macs, droppable, other = compute
    if len(block_macs) != len(rates):
        return None
    kept = sum(
        w * (1.0 - r if d else 1.0) for w, r, d in zip(block_macs, rates, droppable, strict=True)
    )
    total = sum(block_macs)
    return {
        "ideal_blocks": kept / total,
        "ideal_step": (kept + other) / (total + other),
        "unweighted_blocks": 1.0
        - sum(r for r, d in zip(rates, droppable, strict=True) if d) / len(rates),
        "macs_per_image": total + other,
    }


def kept_block_compute(name: str, image_size: int, kept: Sequence[float]) -> float | None:
    """MAC-weighted fraction of the block compute kept, for per-block kept fractions ``kept``
    (1/0 gates of one step, or the fraction of steps each block ran); blocks that cannot be
    dropped count as kept. The realized counterpart of ``ideal_ratios(...)["ideal_blocks"]``."""
    compute = block_compute(name, image_size)
    if compute is None or len(compute[0]) != len(kept):
        return None
    block_macs, droppable, _ = compute
    return sum(
        w * (k if d else 1.0) for w, k, d in zip(block_macs, kept, droppable, strict=True)
    ) / sum(block_macs)


def _torch_kept_block_compute(name: str, image_size: int, row: dict | None) -> float | None:
    """``kept_block_compute`` of a PyTorch batch-mode row (its per-droppable-block run counts)."""
    per_droppable = (row or {}).get("branches_run_per_block")
    compute = block_compute(name, image_size)
    if not per_droppable or compute is None or sum(compute[1]) != len(per_droppable):
        return None
    it = iter(per_droppable)
    return kept_block_compute(name, image_size, [next(it) if d else 1.0 for d in compute[1]])


# ---------------------------------------------------------------------------------------------
# JAX.
# ---------------------------------------------------------------------------------------------


def make_optimizer() -> optax.GradientTransformation:
    """SGD, Nesterov momentum 0.9, L2 weight decay 1e-4 (as PyTorch's `SGD(weight_decay=...)`)."""
    return optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True),
    )


def make_train_step(model: Any, tx: optax.GradientTransformation):
    """``step(state, images, labels, base_key, step_index) -> (new_state, loss)``.

    ``state`` is ``(params, batch_stats, opt_state)``; the dropout key of the step is
    ``fold_in(base_key, step_index)``.
    """

    def loss_fn(params, batch_stats, images, labels, key):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        return loss, new_vars.get("batch_stats", {})

    def train_step(state, images, labels, base_key, step_index):
        params, batch_stats, opt_state = state
        key = jax.random.fold_in(base_key, step_index)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, new_batch_stats), grads = grad_fn(params, batch_stats, images, labels, key)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_batch_stats, new_opt_state), loss

    return train_step


def summarize(times_s: Sequence[float]) -> dict[str, Any]:
    ms = [1e3 * t for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "step_ms": ms,
    }


def run_jax(
    name: str,
    setting: Setting,
    wl: Workload,
    args: argparse.Namespace,
    *,
    compile_only: bool = False,
) -> dict[str, Any]:
    """Builds, compiles and (unless ``compile_only``) times the sdjax train step."""
    overrides = dict(setting.overrides)
    if args.dtype:
        overrides["dtype"] = jnp.dtype(args.dtype)
    model = models.create(name, num_classes=NUM_CLASSES, **overrides)
    images, labels = synthetic_batch(wl, args.seed)
    base_key = jax.random.key(args.seed, impl=args.prng_impl)
    tx = make_optimizer()

    def init_state(images):
        variables = model.init({"params": base_key, "dropout": base_key}, images, train=False)
        params = variables["params"]
        return params, variables.get("batch_stats", {}), tx.init(params)

    devices = jax.devices() if setting.data_parallel else jax.devices()[:1]
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    base_key = jax.device_put(base_key, replicated)

    start = time.perf_counter()
    if compile_only:
        state = jax.eval_shape(init_state, jax.ShapeDtypeStruct(images.shape, images.dtype))
    else:
        state = jax.block_until_ready(jax.jit(init_state, out_shardings=replicated)(images))
    init_s = time.perf_counter() - start

    step_fn = jax.jit(
        make_train_step(model, tx),
        in_shardings=(replicated, sharded, sharded, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    images_in, labels_in = (
        (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (images, labels))
        if compile_only
        else (jax.device_put(images, sharded), jax.device_put(labels, sharded))
    )
    start = time.perf_counter()
    lowered = step_fn.lower(state, images_in, labels_in, base_key, jnp.int32(0))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state[0]))
    row: dict[str, Any] = {
        "framework": "jax",
        "model": name,
        "setting": setting.name,
        "model_overrides": {k: str(v) for k, v in overrides.items()},
        "batch_size": wl.batch_size,
        "image_size": wl.image_size,
        "devices": len(devices),
        "num_params": num_params,
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "lower_plus_compile_s": lower_s + compile_s,
    }
    row["block_drop_rates"] = block_drop_rates(model)
    if compile_only:
        return row

    times, faults, system_s = [], [], []
    loss = None
    for step_index in range(args.warmup + args.steps):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        state, loss = compiled(state, images_in, labels_in, base_key, np.int32(step_index))
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - usage.ru_minflt)
        system_s.append(after.ru_stime - usage.ru_stime)
    row.update(summarize(times[args.warmup :]))
    # Whole-process figures (all threads): page faults and kernel CPU time per step, the cost
    # that `sdjax.host_malloc` removes.
    row["page_faults_per_step"] = statistics.median(faults[args.warmup :])
    row["system_cpu_ms_per_step"] = 1e3 * statistics.median(system_s[args.warmup :])
    row["warmup_ms"] = [1e3 * t for t in times[: args.warmup]]
    row["final_loss"] = float(loss)
    if setting.base == "batch":
        # The gates the timed steps drew (recomputed from their keys, no forward pass): batch-mode
        # step times vary with them, so the report sets the realized kept compute beside the
        # expected one.
        gates_of = jax.jit(lambda key: models.batch_gates(model, key))
        gates = [
            np.asarray(gates_of(jax.random.fold_in(base_key, step_index)))
            for step_index in range(args.warmup, args.warmup + args.steps)
        ]
        row["blocks_run_per_step"] = [int(g.sum()) for g in gates]
        row["kept_block_compute_per_step"] = [
            kept_block_compute(name, wl.image_size, g.astype(float).tolist()) for g in gates
        ]
    row["loadavg_after"] = os.getloadavg()
    del state, compiled, lowered
    return row


# ---------------------------------------------------------------------------------------------
# PyTorch.
# ---------------------------------------------------------------------------------------------


def run_torch(
    name: str,
    setting: Setting,
    wl: Workload,
    rates: Sequence[float] | None,
    scale_by_keep: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Times the PyTorch eager peer of ``name`` in the base setting of ``setting``."""
    images, labels = synthetic_batch(wl, args.seed)
    torch.manual_seed(args.seed)
    drop_rates = None if setting.base == "constant" else rates
    model = torch_models.create(
        name,
        drop_rates=drop_rates,
        drop_mode="row" if setting.base == "constant" else setting.base,
        scale_by_keep=scale_by_keep,
        num_classes=NUM_CLASSES,
    )
    step = torch_models.make_train_step(
        model, learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(args.seed + 1)  # the same gate sequence in every run
    residuals = [m for m in model.modules() if isinstance(m, torch_models.StochasticResidual)]
    times = []
    loss = None
    for step_index in range(args.warmup + args.steps):
        if step_index == args.warmup:
            for m in residuals:
                m.branches_run = m.branches_seen = 0
        start = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - start)
    row: dict[str, Any] = {
        "framework": "torch",
        "model": name,
        "setting": setting.base,
        "batch_size": wl.batch_size,
        "image_size": wl.image_size,
        "num_params": sum(p.numel() for p in model.parameters()),
        "scale_by_keep": scale_by_keep,
    }
    row.update(summarize(times[args.warmup :]))
    row["warmup_ms"] = [1e3 * t for t in times[: args.warmup]]
    row["final_loss"] = float(loss)
    seen = sum(m.branches_seen for m in residuals)
    if setting.base == "batch" and seen:
        row["branches_run_fraction"] = sum(m.branches_run for m in residuals) / seen
        # Per droppable block, in forward order: the fraction of timed steps it ran.
        row["branches_run_per_block"] = [
            m.branches_run / m.branches_seen if m.branches_seen else None for m in residuals
        ]
    row["loadavg_after"] = os.getloadavg()
    return row


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _find(rows, framework, model, setting):
    for row in rows:
        if (row["framework"], row["model"], row["setting"]) == (framework, model, setting):
            return row
    return None


def _ratio(a: dict | None, b: dict | None, key: str = "median_ms") -> float | None:
    if a is None or b is None or key not in a or key not in b:
        return None
    return a[key] / b[key]


def _variant(setting_name: str) -> str:
    """``"batch+scan+dp"`` -> ``"+scan+dp"``; ``"batch"`` -> ``""``."""
    base, _, rest = setting_name.partition("+")
    return f"+{rest}" if rest else ""


def summarize_models(rows: list[dict]) -> list[dict[str, Any]]:
    """Per model and modifier group (``variant``, e.g. ``"+scan+dp"``): ideal vs measured
    batch-mode ratios, row-mode overheads and sdjax/PyTorch ratios.

    A group is listed when it has at least two of its constant/row/batch rows or its constant
    row (the PyTorch comparison); ratios whose rows are missing are None.
    """
    out = []
    groups = dict.fromkeys(
        (row["model"], _variant(row["setting"])) for row in rows if row["framework"] == "jax"
    )
    for name, variant in groups:
        jc, jr, jb = (_find(rows, "jax", name, s + variant) for s in BASE_SETTINGS)
        if jc is None and sum(r is not None for r in (jr, jb)) < 2:
            continue
        tc, tr, tb = (_find(rows, "torch", name, s) for s in BASE_SETTINGS)
        rates = next((r["block_drop_rates"] for r in (jb, jr) if r and r["block_drop_rates"]), None)
        image_size = next(r["image_size"] for r in rows if r["model"] == name)
        ideal = ideal_ratios(name, image_size, rates) if rates else None
        entry = {
            "model": name,
            "variant": variant,
            "devices": (jc or jr or jb)["devices"],
            "ideal": ideal,
            "batch_over_constant_median": _ratio(jb, jc),
            "batch_over_constant_mean": _ratio(jb, jc, "mean_ms"),
            "row_overhead_median": None if _ratio(jr, jc) is None else _ratio(jr, jc) - 1.0,
            "torch_batch_over_constant_median": _ratio(tb, tc),
            "torch_batch_over_constant_mean": _ratio(tb, tc, "mean_ms"),
            "torch_row_overhead_median": None if _ratio(tr, tc) is None else _ratio(tr, tc) - 1,
            "torch_branches_run_fraction": (tb or {}).get("branches_run_fraction"),
            # Block compute kept by the gates the timed steps drew (MAC-weighted, like ideal).
            "realized_blocks": (
                statistics.fmean(jb["kept_block_compute_per_step"])
                if jb
                and jb.get("kept_block_compute_per_step")
                and None not in jb["kept_block_compute_per_step"]
                else None
            ),
            "torch_realized_blocks": _torch_kept_block_compute(name, image_size, tb),
            "jax_over_torch_median": {
                s: _ratio(_find(rows, "jax", name, s + variant), _find(rows, "torch", name, s))
                for s in BASE_SETTINGS
            },
        }
        out.append(entry)
    return out


def evaluate_targets(
    rows: list[dict], summary: list[dict], compile_rows: list[dict]
) -> list[dict[str, Any]]:
    """The issue-5 targets that this run measured, each with its value and met / missed."""
    targets = []

    def add(target: str, value: float | None, limit: float, what: str, unit: str = "") -> None:
        if value is None:
            return
        targets.append(
            {
                "target": target,
                "value": value,
                "limit": limit,
                "met": value <= limit,
                "what": what,
                "unit": unit,
            }
        )

    for entry in summary:
        name = entry["model"]
        group = f"{name}, {entry['variant'] or 'no modifier'}"
        if name == "cifar_resnet110":
            add(
                f"batch-mode SD step <= 0.80 x constant ({group})",
                entry["batch_over_constant_median"],
                TARGET_BATCH_RATIO,
                "median batch-mode / median constant-depth step"
                + (
                    f" (the timed steps kept {entry['realized_blocks']:.3f} of the block compute; "
                    f"expected {entry['ideal']['ideal_blocks']:.3f})"
                    if entry["realized_blocks"] is not None and entry["ideal"]
                    else ""
                ),
            )
        if name.startswith("cifar_resnet") and entry["row_overhead_median"] is not None:
            add(
                f"row-mode overhead <= 5% ({group})",
                entry["row_overhead_median"],
                TARGET_ROW_OVERHEAD,
                "median row-mode / median constant-depth step - 1",
            )
        add(
            f"sdjax constant-depth step <= PyTorch eager ({group})",
            entry["jax_over_torch_median"]["constant"],
            TARGET_TORCH_RATIO,
            "median sdjax / median PyTorch step, constant depth",
        )
    for name, limit in TARGET_COMPILE_S.items():
        if name == "cifar_resnet110":
            candidates = [r for r in rows if r["framework"] == "jax" and r["model"] == name]
            what = "slowest lower+compile of the train step over this model's rows"
        else:
            candidates = [r for r in compile_rows if r["model"] == name]
            what = "lower+compile of the train step, scan_blocks=True"
        if candidates:
            worst = max(candidates, key=lambda r: r["lower_plus_compile_s"])
            add(
                f"{name} compile <= {limit:.0f} s",
                worst["lower_plus_compile_s"],
                limit,
                f"{what} (worst: {worst['setting']})",
                " s",
            )
    return targets


def render_markdown(report: dict[str, Any]) -> str:
    prov = report["provenance"]
    rows, summary = report["rows"], report["summary"]
    lines = [
        "# sdjax train-step benchmark",
        "",
        "Produced by `experiments/benchmark.py` in one process run; see its docstring for the "
        "definitions. Times are per training step (forward, backward, SGD-Nesterov update, BN "
        "statistics update), synthetic data, float32 unless stated.",
        "",
        f"- Command: `{prov['command']}`",
        f"- Date (UTC): {prov['date_utc']}; git commit: `{prov['git_commit']}`",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        f"- Machine: {prov['machine']['cpu']}, {prov['machine']['cpu_count']} logical CPUs "
        f"({report['machine_extra']['cpus_available']} available to this process), "
        f"{prov['machine']['platform']}; JAX backend `{prov['machine'].get('jax_backend')}`, "
        f"devices {prov['machine'].get('jax_devices')}",
        f"- PyTorch: {report['torch_status']}",
        f"- Host allocator (`--host_malloc {report['config'].get('host_malloc', 'auto')}`): "
        + (
            "glibc set to reuse freed memory (`sdjax.host_malloc`, as the trainer does on CPU; "
            "it applies to the PyTorch rows of this process too)"
            if report["machine_extra"].get("host_malloc_applied")
            else "glibc defaults"
        )
        + "; median page faults / system CPU ms per sdjax step: "
        + ", ".join(
            f"{r['model']} {r['setting']} {r['page_faults_per_step']:.0f} / "
            f"{r['system_cpu_ms_per_step']:.0f}"
            for r in rows
            if r["framework"] == "jax" and "page_faults_per_step" in r
        ),
        f"- Load average at start / end: {report['machine_extra']['loadavg_start']} / "
        f"{report['machine_extra']['loadavg_end']}",
        f"- Steps: {report['config']['warmup']} warm-up + {report['config']['steps']} timed; "
        f"stochastic depth: {report['config']['drop_schedule']} to "
        f"{report['config']['final_drop_rate']}; sdjax compute dtype "
        f"{report['config']['dtype'] or 'float32'} (PyTorch: float32)",
        "",
        "## Step times",
        "",
    ]
    num_devices = max((r.get("devices", 1) for r in rows), default=1)
    if num_devices > 1:
        lines += [
            f"This process had {num_devices} devices. Rows without `+dp` ran on one of them; on "
            "XLA:CPU they may be slower than the same rows in a one-device process (see the "
            "`--cpu_devices` caveat in the script's docstring).",
            "",
        ]
    headers = [
        "model",
        "setting",
        "batch",
        "input",
        "devices",
        "compile s",
        "median ms",
        "mean ms",
        "min-max ms",
        "PyTorch median ms",
        "PyTorch mean ms",
        "sdjax / PyTorch",
    ]
    table = []
    for row in rows:
        if row["framework"] != "jax":
            continue
        base = row["setting"].split("+")[0]
        peer = _find(rows, "torch", row["model"], base)
        table.append(
            [
                row["model"],
                row["setting"],
                row["batch_size"],
                f"{row['image_size']}x{row['image_size']}x3",
                row["devices"],
                _fmt(row["lower_plus_compile_s"]),
                _fmt(row["median_ms"]),
                _fmt(row["mean_ms"]),
                f"{row['min_ms']:.0f}-{row['max_ms']:.0f}",
                _fmt(peer and peer["median_ms"]),
                _fmt(peer and peer["mean_ms"]),
                _fmt(_ratio(row, peer), ".2f"),
            ]
        )
    lines.append(common.markdown_table(headers, table))
    lines += ["## Stochastic depth: ideal vs measured", ""]
    headers = [
        "model",
        "modifiers",
        "ideal batch/const (block MACs)",
        "ideal batch/const (step MACs)",
        "realized kept (block MACs): sdjax / PyTorch",
        "sdjax batch/const median",
        "sdjax batch/const mean",
        "PyTorch batch/const median",
        "sdjax row overhead",
        "PyTorch row overhead",
    ]
    table = []
    for entry in summary:
        if entry["batch_over_constant_median"] is None and entry["row_overhead_median"] is None:
            continue  # a group without stochastic-depth rows (e.g. one extra constant row)
        ideal = entry["ideal"] or {}

        def pct(v):
            return "n/a" if v is None else f"{100 * v:+.1f}%"

        table.append(
            [
                entry["model"],
                entry["variant"] or "none",
                _fmt(ideal.get("ideal_blocks"), ".3f"),
                _fmt(ideal.get("ideal_step"), ".3f"),
                f"{_fmt(entry['realized_blocks'], '.3f')} / "
                f"{_fmt(entry['torch_realized_blocks'], '.3f')}",
                _fmt(entry["batch_over_constant_median"], ".3f"),
                _fmt(entry["batch_over_constant_mean"], ".3f"),
                _fmt(entry["torch_batch_over_constant_median"], ".3f"),
                pct(entry["row_overhead_median"]),
                pct(entry["torch_row_overhead_median"]),
            ]
        )
    lines.append(common.markdown_table(headers, table))
    if report["compile_only"]:
        lines += ["## Compile only", ""]
        headers = ["model", "setting", "batch", "input", "lower s", "compile s", "total s"]
        table = [
            [
                r["model"],
                r["setting"],
                r["batch_size"],
                f"{r['image_size']}x{r['image_size']}x3",
                _fmt(r["lower_s"]),
                _fmt(r["compile_s"]),
                _fmt(r["lower_plus_compile_s"]),
            ]
            for r in report["compile_only"]
        ]
        lines.append(common.markdown_table(headers, table))
    lines += ["## Targets (issue 5)", ""]
    if report["targets"]:
        table = []
        for t in report["targets"]:
            value = (
                f"{t['value']:.2f}{t['unit']}"
                if t["unit"]
                else (
                    f"{100 * t['value']:+.1f}%"
                    if "overhead" in t["target"]
                    else f"{t['value']:.3f}"
                )
            )
            verdict = "met" if t["met"] else "missed"
            table.append([t["target"], value, verdict, t["what"]])
        lines.append(common.markdown_table(["target", "measured", "verdict", "measured as"], table))
    else:
        lines.append("No target was measured by this run.\n")
    lines += [
        "Ideal ratio: expected fraction of multiply-accumulates kept in batch mode, "
        "`sum_l w_l (1 - r_l) / sum_l w_l` over residual blocks (`w_l`: analytic MACs of block "
        "l's branch, `r_l`: its drop rate); the step column also counts the stem and head, "
        "which are never dropped. Batch-mode times vary with the random gates; every run uses "
        "the same key sequence. Realized kept: the same fraction for the gates the timed steps "
        "drew (sdjax / PyTorch), averaged over those steps.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated sdjax model names (default: cifar_resnet56,cifar_resnet110,"
        "efficientnet_b0; --quick: cifar_resnet20)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated settings for every model: constant|row|batch[+xla|+fast|+scan|+dp] "
        f"(default: {','.join(DEFAULT_SETTINGS)}; --quick: {','.join(BASE_SETTINGS)})",
    )
    parser.add_argument(
        "--extra",
        default=None,
        help="comma-separated MODEL:SETTING extra rows (default: "
        f"{','.join(DEFAULT_EXTRA)}; "
        "--quick: none); models not in --models are skipped",
    )
    parser.add_argument(
        "--compile_only_models",
        default=None,
        help="comma-separated models compiled (scan_blocks=True, constant depth) but not timed "
        "(default: cifar_resnet1202; --quick: none)",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="CIFAR ResNets (default 128)")
    parser.add_argument("--image_size", type=int, default=32, help="CIFAR ResNets (default 32)")
    parser.add_argument("--efficientnet_batch_size", type=int, default=32)
    parser.add_argument("--efficientnet_image_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    parser.add_argument("--final_drop_rate", type=float, default=0.5)
    parser.add_argument("--drop_schedule", default="linear", choices=sorted(schedules.SCHEDULES))
    parser.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prng_impl",
        default="threefry2x32",
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        help="JAX PRNG implementation of the step keys (stochastic-depth gates)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: cifar_resnet20, batch 16, 1 warm-up + 3 steps, nothing extra",
    )
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch column")
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=None,
        help="split the CPU backend into this many devices for the +dp rows (default: the CPU "
        "cores available to the process; no effect on GPU/TPU devices)",
    )
    parser.add_argument(
        "--host_malloc",
        choices=host_malloc.MODES,
        default="auto",
        help="host allocator setting of the process (sdjax.host_malloc; default auto: buffers "
        "reused across steps on CPU, as python -m sdjax.main does; system: glibc's defaults)",
    )
    parser.add_argument("--out_dir", default=str(common.RESULTS_ROOT))
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = {
        "models": "cifar_resnet20" if quick else "cifar_resnet56,cifar_resnet110,efficientnet_b0",
        "settings": ",".join(BASE_SETTINGS if quick else DEFAULT_SETTINGS),
        "extra": "" if quick else ",".join(DEFAULT_EXTRA),
        "compile_only_models": "" if quick else "cifar_resnet1202",
        "batch_size": 16 if quick else 128,
        "steps": 3 if quick else 20,
        "warmup": 1 if quick else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.cpu_devices is None:
        args.cpu_devices = available_cpus()
    if args.cpu_devices < 1:
        parser.error(f"--cpu_devices must be >= 1, got {args.cpu_devices}")
    for setting in _csv(args.settings) + [e.partition(":")[2] for e in _csv(args.extra)]:
        try:
            parse_setting(setting, args.final_drop_rate, args.drop_schedule)
        except ValueError as error:
            parser.error(str(error))
    for name in _csv(args.models) + _csv(args.compile_only_models):
        if name not in models.names():
            parser.error(f"unknown model {name!r}; valid names: {', '.join(models.names())}")
    return args


def available_cpus() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    loadavg_start = os.getloadavg()
    cpus = available_cpus()
    malloc_applied = host_malloc.configure(args.host_malloc)
    # Called from Python after JAX started (e.g. by a test), the existing devices are kept.
    train.request_cpu_devices(args.cpu_devices)
    num_devices = len(jax.devices())
    model_names = _csv(args.models)
    settings = [
        parse_setting(s, args.final_drop_rate, args.drop_schedule) for s in _csv(args.settings)
    ]
    plan: list[tuple[str, Setting]] = [(name, s) for name in model_names for s in settings]
    for item in _csv(args.extra):
        name, _, setting_name = item.partition(":")
        if name in model_names and all((name, setting_name) != (n, s.name) for n, s in plan):
            plan.append(
                (name, parse_setting(setting_name, args.final_drop_rate, args.drop_schedule))
            )
    plan.sort(key=lambda item: model_names.index(item[0]))  # keep a model's rows together
    for name, setting in plan:
        batch = workload(name, args).batch_size
        if setting.data_parallel and batch % num_devices:
            raise SystemExit(
                f"error: {name} {setting.name}: batch size {batch} is not divisible by the "
                f"{num_devices} devices of the data-parallel rows; change the batch size or "
                "--cpu_devices"
            )

    if args.no_torch:
        torch_status = "skipped (--no_torch)"
    elif torch is None:
        torch_status = f"skipped (torch not importable: {TORCH_IMPORT_ERROR})"
    else:
        torch.set_num_threads(cpus)
        torch_status = f"torch {torch.__version__}, eager on CPU, {torch.get_num_threads()} threads"
        if jax.default_backend() != "cpu":
            torch_status += f" (sdjax runs on {jax.default_backend()}: the ratio compares devices)"
    use_torch = torch_status.startswith("torch ")
    print(f"[benchmark] PyTorch column: {torch_status}", flush=True)

    rows: list[dict[str, Any]] = []
    for name, setting in plan:
        wl = workload(name, args)
        row = run_jax(name, setting, wl, args)
        rows.append(row)
        print(
            f"[benchmark] jax   {name:16s} {setting.name:14s} compile {row['lower_plus_compile_s']:6.1f} s"
            f"  median {row['median_ms']:8.1f} ms  mean {row['mean_ms']:8.1f} ms",
            flush=True,
        )
        gc.collect()
        peer_available = use_torch and name in torch_models.available()
        if peer_available and _find(rows, "torch", name, setting.base) is None:
            model_fields = models.create(name, num_classes=NUM_CLASSES, **setting.overrides)
            trow = run_torch(
                name,
                setting,
                wl,
                row["block_drop_rates"],
                bool(model_fields.scale_by_keep),
                args,
            )
            rows.append(trow)
            print(
                f"[benchmark] torch {name:16s} {setting.base:14s}"
                f"                   median {trow['median_ms']:8.1f} ms  mean {trow['mean_ms']:8.1f} ms",
                flush=True,
            )
            gc.collect()

    compile_rows = []
    for name in _csv(args.compile_only_models):
        setting = parse_setting("constant+scan", args.final_drop_rate, args.drop_schedule)
        crow = run_jax(name, setting, workload(name, args), args, compile_only=True)
        compile_rows.append(crow)
        print(
            f"[benchmark] jax   {name:16s} {setting.name:14s} compile only: lower {crow['lower_s']:.1f} s"
            f" + compile {crow['compile_s']:.1f} s",
            flush=True,
        )
        gc.collect()

    summary = summarize_models(rows)
    prov = common.provenance()
    prov["versions"] = common.versions(("jax", "jaxlib", "flax", "optax", "numpy", "torch"))
    report = {
        "provenance": prov,
        "machine_extra": {
            "cpus_available": cpus,
            "host_malloc_applied": malloc_applied,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "torch_status": torch_status,
        "config": vars(args),
        "rows": rows,
        "compile_only": compile_rows,
        "summary": summary,
        "targets": evaluate_targets(rows, summary, compile_rows),
    }
    out_dir = pathlib.Path(args.out_dir)
    common.write_json(out_dir / "benchmark.json", report)
    markdown = render_markdown(report)
    (out_dir / "benchmark.md").write_text(markdown, encoding="utf-8")
    print(markdown, flush=True)
    print(f"[benchmark] wrote {out_dir / 'benchmark.json'} and {out_dir / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
