"""Tests of sdjax.models: sizes, shapes, stochastic-depth wiring, scan vs unrolled, errors.

Everything runs on tiny inputs (CIFAR ResNet-20 on 2x8x8x3, EfficientNet-B0 on 32x32); parameter
counts of the big networks come from `jax.eval_shape` (no real initialization).
"""

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze
from jax import lax

import sdjax.models as models
from sdjax import layers, row_subset
from sdjax.models.blocks import ResidualBlock
from sdjax.models.stages import apply_stage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

DROPOUT_KEY = jax.random.key(42)


def count_params(model, size):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def tiny_images(shape=(2, 8, 8, 3), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def max_abs_diff(a, b):
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def init(model, x, seed=0):
    """Deterministic stand-in for ``model.init`` (no compile: real inits cost seconds of CPU).

    Shapes come from ``jax.eval_shape(model.init)`` (which traces the real init); kernels are
    He-normal, BatchNorm scales and running variances ~1, biases and running means small noise.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[-3:-1] if len(leaf.shape) >= 4 else leaf.shape[-2:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = 1.0 + 0.1 * rng.uniform(size=leaf.shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return unfreeze(jax.tree_util.tree_map_with_path(fill, shapes))


@functools.cache
def train_apply(model):
    """Jitted ``apply(variables, x, key)`` in training mode -> (logits, new batch_stats).

    Cached per model (Flax modules hash by their fields), so tests share compiled programs.
    """

    def fn(variables, x, key):
        logits, updates = model.apply(
            variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return logits, updates["batch_stats"]

    return jax.jit(fn)


@functools.cache
def eval_apply(model):
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


@functools.cache
def scaled_train_apply(model):
    """Like :func:`train_apply` with a traced ``drop_rate_scale`` argument."""

    def fn(variables, x, key, scale):
        logits, updates = model.apply(
            variables,
            x,
            train=True,
            drop_rate_scale=scale,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return logits, updates["batch_stats"]

    return jax.jit(fn)


@pytest.fixture(scope="module")
def cifar_variables():
    """Variables of ``models.create("cifar_resnet20")`` (scanned layout) for 2x8x8x3 inputs."""
    x = tiny_images()
    return init(models.create("cifar_resnet20"), x), x


def layout_variables(variables, scan_blocks):
    """Scanned-layout ``variables`` in the layout of a ``scan_blocks`` model."""
    return variables if scan_blocks else models.scan_to_unrolled(variables)


# ----------------------------------------------------------------------------------------------
# Registry, parameter counts, shapes.


def test_names_cover_all_families():
    expected = (
        [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 152, 1202)]
        + [f"resnet{d}" for d in (18, 34, 50, 101, 152)]
        + [f"efficientnet_b{i}" for i in range(8)]
        + ["vit_ti16", "vit_s16", "vit_b16", "convnext_tiny", "convnext_small", "convnext_base"]
    )
    assert models.names() == expected


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("cifar_resnet110", 32, 1_727_962),
        ("resnet50", 224, 25_557_032),
        ("efficientnet_b0", 224, 5_288_548),
    ],
)
def test_reference_parameter_counts(name, size, expected):
    # Unrolled layout here; the scanned layout is counted in test_every_model_parameter_count.
    assert count_params(models.create(name, scan_blocks=False), size) == expected


# Reference sizes (1000 classes for ImageNet models, 10 for CIFAR): torchvision's ResNets and the
# reference EfficientNets.
PARAMETER_COUNTS = {
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet44": 658_586,
    "cifar_resnet56": 853_018,
    "cifar_resnet110": 1_727_962,
    "cifar_resnet152": 2_408_474,
    "cifar_resnet1202": 19_421_274,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    # ConvNeXt: timm's convnext_{tiny,small,base} (no parameter depends on the image size).
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    # ViT: timm's deit_{tiny,small,base}_patch16_224 less the position embeddings of the
    # 197 - 17 tokens a 64 x 64 image does not have: 180 x width (192, 384, 768).
    "vit_ti16": 5_717_416 - 180 * 192,
    "vit_s16": 22_050_664 - 180 * 384,
    "vit_b16": 86_567_656 - 180 * 768,
}


def test_every_model_parameter_count():
    counts = {}
    for name in models.names():
        # The default (scanned) layout traces fast; the count is the same (see above).
        size = 32 if name.startswith("cifar") else 64
        counts[name] = count_params(models.create(name), size)
    assert counts == PARAMETER_COUNTS


def test_block_counts_and_schedule():
    cifar = models.create("cifar_resnet110")
    assert cifar.num_blocks == 54
    rates = cifar.block_rates(cifar.num_blocks)
    assert rates[0] == pytest.approx(0.5 / 54) and rates[-1] == 0.5
    assert models.create("resnet50").num_blocks == 16
    assert models.create("resnet152").num_blocks == 50
    assert models.create("efficientnet_b0").num_blocks == 16


def test_defaults_follow_paper_and_reference():
    cifar = models.create("cifar_resnet110")
    assert (cifar.final_drop_rate, cifar.drop_schedule, cifar.drop_mode, cifar.scale_by_keep) == (
        0.5,
        "linear",
        "batch",
        False,
    )
    effnet = models.create("efficientnet_b3")
    assert (effnet.final_drop_rate, effnet.drop_schedule, effnet.drop_mode) == (
        0.2,
        "efficientnet",
        "row",
    )
    assert effnet.scale_by_keep and effnet.dropout_rate == 0.3 and effnet.image_size == 300
    assert [models.create(f"efficientnet_b{i}").dropout_rate for i in range(8)] == [
        0.2,
        0.2,
        0.3,
        0.3,
        0.4,
        0.4,
        0.5,
        0.5,
    ]


def test_cifar_resnet_shapes_train_and_eval(cifar_variables):
    variables, x = cifar_variables
    model = models.create("cifar_resnet20")
    logits, new_stats = train_apply(model)(variables, x, DROPOUT_KEY)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    eval_logits = eval_apply(model)(variables, x)
    assert eval_logits.shape == (2, 10) and eval_logits.dtype == jnp.float32
    # Train mode normalizes with batch statistics (and drops blocks); eval does neither.
    assert not np.allclose(logits, eval_logits, atol=1e-3)
    # Another key draws other gates (the same key the same ones: see the batch_gates tests).
    other_logits, _ = train_apply(model)(variables, x, jax.random.fold_in(DROPOUT_KEY, 1))
    assert not np.allclose(logits, other_logits, atol=1e-3)
    assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )


#: EfficientNet-B0 in batch mode with the XLA convolution (faster to compile; the fast one is
#: tested in test_conv.py), shared by the tests below so that each worker compiles it once.
EFFNET_BATCH_MODE = models.create(
    "efficientnet_b0", num_classes=5, conv_impl="xla", drop_mode="batch", final_drop_rate=0.5
)


def test_efficientnet_b0_and_resnet50_shapes():
    x = tiny_images((1, 32, 32, 3))
    effnet = EFFNET_BATCH_MODE
    logits, _ = train_apply(effnet)(init(effnet, x), x, DROPOUT_KEY)
    assert logits.shape == (1, 5) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    resnet = models.create("resnet50", num_classes=3, width=4, conv_impl="xla")
    logits = eval_apply(resnet)(init(resnet, x), x)
    assert logits.shape == (1, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_keeps_float32_params_and_logits(cifar_variables):
    variables, x = cifar_variables
    model = models.create("cifar_resnet20", dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
    logits, _ = train_apply(model)(variables, x, DROPOUT_KEY)
    assert logits.dtype == jnp.float32
    # Same key, same gates: close to the float32 network.
    reference, _ = train_apply(models.create("cifar_resnet20"))(variables, x, DROPOUT_KEY)
    np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Stochastic depth wiring.


def shortcut_only_logits(variables, x, widths=(16, 32, 64), epsilon=1e-5):
    """CIFAR ResNet with every residual branch removed (training-mode stem BN), in plain JAX."""
    params = variables["params"]
    y = lax.conv_general_dilated(
        x, params["stem_conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean = y.mean(axis=(0, 1, 2))
    var = y.var(axis=(0, 1, 2))
    y = (y - mean) / jnp.sqrt(var + epsilon)
    y = jax.nn.relu(y * params["stem_bn"]["scale"] + params["stem_bn"]["bias"])
    for stage, features in enumerate(widths):
        if stage > 0:  # 2x2 average pooling with stride 2, then zero channels.
            n, h, w, c = y.shape
            y = y.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, features - y.shape[-1])))
    y = y.mean(axis=(1, 2))
    return y @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.mark.parametrize("drop_mode", ["batch", "row"])
def test_every_block_dropped_equals_shortcut_path(cifar_variables, drop_mode):
    variables, x = cifar_variables
    model = models.create(
        "cifar_resnet20", final_drop_rate=1.0, drop_schedule="uniform", drop_mode=drop_mode
    )
    logits, new_stats = train_apply(model)(variables, x, DROPOUT_KEY)
    np.testing.assert_allclose(logits, shortcut_only_logits(variables, x), rtol=1e-5, atol=1e-5)
    for name, stats in new_stats.items():
        changed = max_abs_diff(stats, variables["batch_stats"][name]) > 0
        if drop_mode == "batch":
            # Dropped blocks are not computed: their BatchNorm statistics are untouched.
            assert changed == (name == "stem_bn"), name
        else:
            # Row mode computes every branch and masks it.
            assert changed, name


def test_rate_zero_train_and_eval_differ_only_by_batch_norm(cifar_variables):
    # With momentum 0 the running averages become this batch's statistics; evaluating with them
    # reproduces the training output when nothing is dropped (and no dropout key is needed).
    variables, x = cifar_variables
    model = models.create("cifar_resnet20", final_drop_rate=0.0, bn_momentum=0.0)
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    eval_variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    np.testing.assert_allclose(eval_apply(model)(eval_variables, x), logits, rtol=1e-4, atol=1e-4)
    # ... while the initial running averages give a different output.
    assert not np.allclose(eval_apply(model)(variables, x), logits, atol=1e-3)


def test_batch_mode_compiles_to_a_conditional_and_row_mode_does_not():
    x = tiny_images()
    for drop_mode, expect_cond in (("batch", True), ("row", False)):
        model = models.create("cifar_resnet20", drop_mode=drop_mode)  # scanned by default
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        jaxpr = str(
            jax.make_jaxpr(
                lambda v, x, m=model: m.apply(
                    v, x, train=True, rngs={"dropout": DROPOUT_KEY}, mutable=["batch_stats"]
                )
            )(variables, x)
        )
        # Each oneDNN convolution (conv_impl "auto" on CPU) is a platform_dependent: one
        # platform_index and one cond that lowering resolves to its CPU branch.
        gate_conds = jaxpr.count("cond[") - jaxpr.count("platform_index[")
        assert (gate_conds > 0) == expect_cond, drop_mode
        assert "scan[" in jaxpr


@pytest.mark.parametrize("drop_mode", ["batch", "row"])
def test_scan_and_unrolled_agree(cifar_variables, drop_mode):
    """Same parameters and dropout key: same logits and BatchNorm updates in both layouts."""
    scan_variables, x = cifar_variables
    # Batch mode: the defaults (linear decay to 0.5); row mode: uniform 0.5.
    kwargs = {} if drop_mode == "batch" else dict(drop_schedule="uniform", drop_mode="row")
    scanned = models.create("cifar_resnet20", **kwargs)
    unrolled = models.create("cifar_resnet20", scan_blocks=False, **kwargs)
    variables = models.scan_to_unrolled(scan_variables)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        jax.eval_shape(unrolled.init, jax.random.key(0), x)
    )
    logits, stats = train_apply(unrolled)(variables, x, DROPOUT_KEY)
    scan_logits, scan_stats = train_apply(scanned)(scan_variables, x, DROPOUT_KEY)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-5)
    assert max_abs_diff(models.scan_to_unrolled(scan_stats), stats) < 1e-5
    if drop_mode == "batch":
        # The key draws a mix of kept and dropped blocks (so the comparison means something).
        changed = [
            max_abs_diff(stats[name], variables["batch_stats"][name]) > 0
            for name in stats
            if "_block" in name
        ]
        assert any(changed) and not all(changed), changed
        np.testing.assert_allclose(
            eval_apply(scanned)(scan_variables, x),
            eval_apply(unrolled)(variables, x),
            rtol=1e-5,
            atol=1e-5,
        )
        rematted = models.create("cifar_resnet20", remat=True)
        remat_logits, _ = train_apply(rematted)(scan_variables, x, DROPOUT_KEY)
        np.testing.assert_allclose(remat_logits, logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Row-subset mode.


@functools.cache
def loss_and_grads(model):
    """Jitted ``(variables, x, key) -> ((loss, (logits, batch_stats)), grads)`` in training mode:
    the sum of squared logits and its gradient w.r.t. the parameters (cached per model)."""

    def fn(variables, x, key):
        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return jnp.sum(logits**2), (logits, updates["batch_stats"])

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    return jax.jit(fn)


def test_row_subset_trains_and_scan_equals_unrolled_at_a_uniform_rate(cifar_variables):
    """Uniform rate: every block keeps the same k, so both layouts compute the same function."""
    scan_variables = cifar_variables[0]
    x = tiny_images((8, 8, 8, 3))
    kwargs = dict(drop_mode="row_subset", drop_schedule="uniform", final_drop_rate=0.5)
    scanned = models.create("cifar_resnet20", **kwargs)
    unrolled = models.create("cifar_resnet20", scan_blocks=False, **kwargs)
    variables = models.scan_to_unrolled(scan_variables)
    (loss, (logits, stats)), grads = loss_and_grads(unrolled)(variables, x, DROPOUT_KEY)
    (_, (scan_logits, scan_stats)), scan_grads = loss_and_grads(scanned)(
        scan_variables, x, DROPOUT_KEY
    )
    assert np.isfinite(loss) and logits.shape == (8, 10)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-5)
    assert max_abs_diff(models.scan_to_unrolled(scan_stats), stats) < 1e-5
    assert max_abs_diff(models.scan_to_unrolled(scan_grads), grads) < 1e-4
    # Every block ran on its k = 4 samples: all BatchNorm statistics moved, all kernels get a
    # gradient; another key draws other subsets.
    assert all(blocks_that_ran(variables["batch_stats"], stats))
    kernels = [
        g["residual"]["branch"]["conv1"]["kernel"] for n, g in grads.items() if "_block" in n
    ]
    assert all(float(jnp.max(jnp.abs(k))) > 0 for k in kernels)
    (_, (other_logits, _)), _ = loss_and_grads(unrolled)(
        variables, x, jax.random.fold_in(DROPOUT_KEY, 1)
    )
    assert not np.allclose(other_logits, logits, atol=1e-3)


@functools.cache
def _no_drop_eval():
    """Eval of the unrolled ResNet-20 without stochastic depth (final_drop_rate 0)."""
    return eval_apply(models.create("cifar_resnet20", final_drop_rate=0.0, scan_blocks=False))


@pytest.mark.parametrize("scale_by_keep", [False, True])
@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_row_and_row_subset_eval_scale_each_branch_by_its_keep_rate(
    cifar_variables, mode, scale_by_keep
):
    """Eval of ResNet-20 (linear decay to 0.5: block l = 1..9 has rate 0.5 * l / 9), in row and
    row-subset mode, against a second computation: the network without stochastic depth whose
    branches end in a BatchNorm with scale and bias times ``1 - 0.5 * l / 9`` (the paper's eval
    scaling, ``scale_by_keep=False``) or unchanged (``scale_by_keep=True``)."""
    variables, x = cifar_variables
    unrolled = models.scan_to_unrolled(variables)
    scaled = jax.tree_util.tree_map(lambda a: a, unrolled)  # a copy of the nested dicts
    names = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(3)]
    assert sorted(names) == sorted(n for n in unrolled["params"] if "_block" in n)
    for layer, name in enumerate(names, start=1):
        keep = 1.0 if scale_by_keep else 1.0 - 0.5 * layer / 9
        bn2 = scaled["params"][name]["residual"]["branch"]["bn2"]
        bn2["scale"], bn2["bias"] = bn2["scale"] * keep, bn2["bias"] * keep
    expected = _no_drop_eval()(scaled, x)
    model = models.create("cifar_resnet20", drop_mode=mode, scale_by_keep=scale_by_keep)
    out = eval_apply(model)(variables, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    if not scale_by_keep:  # the scaling is visible in the logits
        assert max_abs_diff(out, _no_drop_eval()(unrolled, x)) > 1e-2


@pytest.mark.parametrize(
    "name, overrides",
    [("efficientnet_b0", dict(num_classes=5)), ("resnet18", dict(num_classes=3, width=4))],
)
def test_row_subset_traces_in_every_family(name, overrides):
    """EfficientNet (blocks without an identity shortcut, stages of 1-4 blocks) and the ImageNet
    ResNet build the row-subset step; traced only (compiling them costs a minute of CPU)."""
    x = tiny_images((4, 32, 32, 3))
    for drop_mode in ("row_subset", "row"):
        model = models.create(name, drop_mode=drop_mode, **overrides)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)

        def step(v, m=model):
            return m.apply(v, x, train=True, rngs={"dropout": DROPOUT_KEY}, mutable=["batch_stats"])

        logits, _ = jax.eval_shape(step, variables)
        assert logits.shape == (4, overrides["num_classes"])
        # The branch outputs of the subset are scatter-added into the shortcut.
        scatters = str(jax.make_jaxpr(step)(variables)).count("scatter-add")
        assert (scatters > 0) == (drop_mode == "row_subset"), (drop_mode, scatters)


class _BiasBlock(ResidualBlock):
    """A block whose branch is one Dense layer (per sample: no batch statistics)."""

    @nn.compact
    def __call__(self, x, rate, block_index, key):
        branch = functools.partial(nn.Dense, self.features)
        return self.residual(branch, x, x, rate, block_index, key)


class _DenseStage(nn.Module):
    """One stage of ``_BiasBlock`` s in row-subset mode (``apply_stage``, as the models call it)."""

    rates: tuple[float, ...]
    scan_blocks: bool
    num_shards: int = 2

    @nn.compact
    def __call__(self, x, key, drop_rate_scale=None):
        drop_path = functools.partial(
            layers.DropPathResidual,
            mode="row_subset",
            scale_by_keep=True,
            num_shards=self.num_shards,
        )
        block = dict(features=x.shape[-1], conv=None, norm=None, drop_path=drop_path)
        return apply_stage(
            _BiasBlock,
            x,
            name="stage",
            first_kwargs=block,
            rest_kwargs=block,
            rates=self.rates,
            first_index=0,
            key=key,
            scan_blocks=self.scan_blocks,
            remat=False,
            drop_rate_scale=drop_rate_scale,
        )


STAGE_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)  # k of 6 samples per shard: 5, 5, 4, 4, 3


def _one_hot_stage_params(scan_blocks):
    """Block b: kernel 0 and bias e_b, so column b of the output marks where block b ran."""
    n = len(STAGE_RATES)
    params = {
        f"stage_block{b}": {"residual": {"branch": {"kernel": jnp.zeros((n, n)), "bias": e}}}
        for b, e in enumerate(jnp.eye(n))
    }
    return models.unrolled_to_scan(params) if scan_blocks else params


@pytest.mark.parametrize("scale", [None, 0.5])
def test_scanned_row_subset_blocks_keep_their_own_k(scale):
    """Linear rates in one scan body (padded to the stage's largest k): block b still adds its
    branch, scaled by L / k_b, to exactly k_b samples per shard, the unrolled blocks' samples.
    With a drop_rate_scale (here 0.5, so larger k than the unscaled stage's) likewise."""
    n, local = len(STAGE_RATES), 6
    x = jnp.zeros((2 * local, n))
    scale = None if scale is None else jnp.float32(scale)
    outs = {}
    for scan_blocks in (True, False):
        stage = _DenseStage(STAGE_RATES, scan_blocks)
        params = _one_hot_stage_params(scan_blocks)
        outs[scan_blocks] = np.asarray(
            jax.jit(lambda p, s, m=stage: m.apply({"params": p}, x, DROPOUT_KEY, s))(params, scale)
        )
    np.testing.assert_array_equal(outs[True] != 0, outs[False] != 0)
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-6)
    for b, rate in enumerate(STAGE_RATES):
        if scale is not None:
            rate = float(np.float32(rate) * np.float32(scale))
        k = row_subset.subset_size(local, rate)
        column = outs[True][:, b].reshape(2, local)
        assert (column != 0).sum(axis=1).tolist() == [k, k], (b, column)
        np.testing.assert_allclose(column[column != 0], local / k, rtol=1e-6)
    assert [row_subset.subset_size(local, r) for r in STAGE_RATES] == [5, 5, 4, 4, 3]


def test_scanned_row_subset_values_and_grads_equal_unrolled():
    """A per-sample branch with linear rates: the padded scan gives the unrolled values and
    gradients (parameters and input), for the same key."""
    n = len(STAGE_RATES)
    x = jax.random.normal(jax.random.key(3), (12, n))
    unrolled_stage = _DenseStage(STAGE_RATES, scan_blocks=False)
    params = unrolled_stage.init(jax.random.key(4), x, None)["params"]
    results = {}
    for scan_blocks in (True, False):
        stage = _DenseStage(STAGE_RATES, scan_blocks)
        p = models.unrolled_to_scan(params) if scan_blocks else params

        def loss(p, x, m=stage):
            return jnp.sum(jnp.sin(m.apply({"params": p}, x, DROPOUT_KEY)))

        value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)
        results[scan_blocks] = (value, models.scan_to_unrolled(gp) if scan_blocks else gp, gx)
    (v1, gp1, gx1), (v0, gp0, gx0) = results[True], results[False]
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    # Float32 reassociation only (scan and unrolled fuse differently; on AVX2 hosts the
    # gradients differ by ~3e-5 of their largest entry): relative to that entry.
    for g1, g0 in ((gp1, gp0), (gx1, gx0)):
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
        assert max_abs_diff(g1, g0) < 1e-4 * scale, (max_abs_diff(g1, g0), scale)


def test_row_subset_shards_must_divide_the_batch():
    model = models.create("cifar_resnet20", drop_mode="row_subset", drop_shards=4)
    x = tiny_images((6, 8, 8, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_shards=4 must divide the batch size 6"):
        jax.eval_shape(
            lambda v: model.apply(
                v, x, train=True, rngs={"dropout": DROPOUT_KEY}, mutable=["batch_stats"]
            ),
            variables,
        )


SHARDED_ROW_SUBSET_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import sdjax.models as models

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    COLLECTIVE = re.compile(
        r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
        r"(-start)?\\(")

    def activation_collectives(drop_shards):
        \"\"\"Shapes moved between the devices by a train step's gradient that are not (a
        permutation of) a parameter's shape or a vector: batch activations.\"\"\"
        model = models.create("cifar_resnet20", drop_mode="row_subset", drop_shards=drop_shards)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        allowed = set()
        for leaf in jax.tree.leaves(variables["params"]):
            allowed |= {tuple(sorted(leaf.shape)), tuple(sorted(leaf.shape[1:]))}

        def loss(params, stats, x, key):
            logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                    rngs={"dropout": key}, mutable=["batch_stats"])
            return jnp.sum(logits ** 2)

        step = jax.jit(jax.grad(loss), in_shardings=(replicated, replicated, batch, replicated))
        args = (variables["params"], variables["batch_stats"], x, jax.random.key(2))
        hlo = step.lower(*args).compile().as_text()
        moved = []
        for match in COLLECTIVE.finditer(hlo):
            for dims in re.findall(r"[a-z][a-z0-9]*\\[([0-9,]*)\\]", match.group(1)):
                shape = tuple(int(d) for d in dims.split(",") if d)
                if len(shape) > 1 and tuple(sorted(shape)) not in allowed:
                    moved.append((match.group(2), shape))
        return moved

    assert activation_collectives(2) == [], activation_collectives(2)
    # One subset drawn over the sharded batch: the drawn rows move between the devices.
    assert activation_collectives(1), "expected activations to cross devices"
    print("OK")
    """
)


def test_row_subset_sharded_batch_compiles_without_gathering_activations():
    """Two CPU devices in a fresh process: with drop_shards=2 the train step's gradient moves no
    activations between the devices (only parameter gradients and BatchNorm statistics)."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_ROW_SUBSET_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout


_BLOCK_NAME = re.compile(r"^stage(\d+)_block(\d+)$")


def blocks_that_ran(old_stats, new_stats):
    """Per block, in forward order: did its BatchNorm statistics change (i.e. did it run)?"""
    names = sorted(
        (tuple(int(g) for g in _BLOCK_NAME.match(n).groups()), n)
        for n in new_stats
        if _BLOCK_NAME.match(n)
    )
    return [max_abs_diff(new_stats[n], old_stats[n]) > 0 for _, n in names]


def blocks_that_ran_in_layout(variables, new_stats, scan_blocks):
    """:func:`blocks_that_ran` for variables and updated statistics of either layout."""
    if scan_blocks:
        variables, new_stats = (
            models.scan_to_unrolled(variables),
            models.scan_to_unrolled(new_stats),
        )
    return blocks_that_ran(variables["batch_stats"], new_stats)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_batch_gates_are_the_blocks_a_step_computes(cifar_variables, scan_blocks):
    """batch_gates(model, key) == the blocks whose BatchNorm statistics the step updates."""
    variables = layout_variables(cifar_variables[0], scan_blocks)
    x = cifar_variables[1]
    model = models.create("cifar_resnet20", scan_blocks=scan_blocks)  # batch mode, linear 0.5
    seen = set()
    for seed in range(6):
        key = jax.random.fold_in(DROPOUT_KEY, seed)
        gates = models.batch_gates(model, key)
        assert gates.shape == (9,) and gates.dtype == jnp.bool_
        _, stats = train_apply(model)(variables, x, key)
        assert blocks_that_ran_in_layout(variables, stats, scan_blocks) == list(np.asarray(gates))
        seen.add(tuple(np.asarray(gates)))
    # Different keys draw different gates, and some blocks are dropped.
    assert len(seen) > 1 and not all(all(g) for g in seen)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_drop_rate_scale_multiplies_every_block_rate(cifar_variables, scan_blocks):
    """Scale 0: nothing dropped; scale 1: the unscaled step; 0.5: the gates of batch_gates."""
    variables = layout_variables(cifar_variables[0], scan_blocks)
    x = cifar_variables[1]
    model = models.create("cifar_resnet20", scan_blocks=scan_blocks)  # batch mode, linear 0.5
    step = scaled_train_apply(model)  # the scale is a traced argument
    logits, stats = train_apply(model)(variables, x, DROPOUT_KEY)
    one_logits, one_stats = step(variables, x, DROPOUT_KEY, jnp.float32(1.0))
    np.testing.assert_allclose(one_logits, logits, rtol=1e-6, atol=1e-6)
    assert max_abs_diff(one_stats, stats) < 1e-6
    assert not all(blocks_that_ran_in_layout(variables, stats, scan_blocks))
    _, zero_stats = step(variables, x, DROPOUT_KEY, jnp.float32(0.0))
    assert all(blocks_that_ran_in_layout(variables, zero_stats, scan_blocks))
    assert bool(jnp.all(models.batch_gates(model, DROPOUT_KEY, drop_rate_scale=0.0)))
    half = jnp.float32(0.5)
    gates_of = jax.jit(lambda key, scale: models.batch_gates(model, key, drop_rate_scale=scale))
    ran_counts = []
    for seed in range(4):
        key = jax.random.fold_in(DROPOUT_KEY, seed)
        gates = gates_of(key, half)
        _, half_stats = step(variables, x, key, half)
        ran = blocks_that_ran_in_layout(variables, half_stats, scan_blocks)
        assert ran == list(np.asarray(gates)), seed
        ran_counts.append(sum(ran))
    assert min(ran_counts) < 9


@pytest.mark.parametrize("scale", [-0.5, float("nan"), True, "1", np.ones(2)])
def test_invalid_drop_rate_scale_is_a_clear_error(scale):
    model = models.create("cifar_resnet20")
    with pytest.raises(ValueError, match="drop_rate_scale"):
        models.batch_gates(model, DROPOUT_KEY, drop_rate_scale=scale)
    x = tiny_images()
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="drop_rate_scale"):
        jax.eval_shape(lambda v: model.apply(v, x, drop_rate_scale=scale), variables)


def test_batch_gates_of_efficientnet_keep_blocks_without_identity_shortcut():
    x = tiny_images((1, 32, 32, 3))
    model = EFFNET_BATCH_MODE
    variables = init(model, x)
    rates = model.effective_block_rates()
    assert len(rates) == model.num_blocks == 16
    # Stage-first blocks that change the stride or width have no identity shortcut: rate 0.
    droppable = [r > 0 for r in rates]
    assert droppable.count(False) == 7 and not droppable[0] and droppable[-2]
    gates = models.batch_gates(model, DROPOUT_KEY)
    _, stats = train_apply(model)(variables, x, DROPOUT_KEY)
    assert blocks_that_ran_in_layout(variables, stats, model.scan_blocks) == list(np.asarray(gates))
    assert all(g for g, d in zip(np.asarray(gates), droppable, strict=True) if not d)
    assert not all(np.asarray(gates))


def test_create_builds_the_fast_path():
    """A model from create(name) has scanned stages and the automatic convolution, no switch."""
    model = models.create("cifar_resnet20")
    assert model.scan_blocks is True and model.conv_impl == "auto"
    params = jax.eval_shape(model.init, jax.random.key(0), tiny_images())["params"]
    kernel = params["stage1_rest"]["residual"]["branch"]["conv1"]["kernel"]
    assert kernel.shape == (2, 3, 3, 16, 16)  # blocks 1..2 of stage 1, stacked
    assert "stage1_block1" not in params and "stage1_block0" in params


def test_layout_converters_round_trip(cifar_variables):
    variables, _ = cifar_variables
    unrolled = models.scan_to_unrolled(variables)
    assert "stage1_rest" not in unrolled["params"]
    kernel = unrolled["params"]["stage1_block2"]["residual"]["branch"]["conv1"]["kernel"]
    np.testing.assert_array_equal(
        kernel, variables["params"]["stage1_rest"]["residual"]["branch"]["conv1"]["kernel"][1]
    )
    assert max_abs_diff(models.unrolled_to_scan(unrolled), variables) == 0


# ----------------------------------------------------------------------------------------------
# Errors.


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="cifar_resnet110.*efficientnet_b7"):
        models.create("resnet999")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dropout=0.1), "unknown field.*final_drop_rate"),
        (dict(final_drop_rate=1.5), "final_drop_rate.*1.5"),
        (dict(final_drop_rate=float("nan")), "final_drop_rate.*nan"),
        (dict(final_drop_rate=-0.1), "final_drop_rate"),
        (dict(final_drop_rate=True), "final_drop_rate"),
        (dict(drop_schedule="cosine"), "drop_schedule='cosine'.*linear"),
        (dict(drop_mode="sample"), "drop_mode='sample'.*row, batch, row_subset"),
        (dict(drop_shards=0), "drop_shards must be an integer >= 1, got 0"),
        (dict(drop_shards=True), "drop_shards must be an integer >= 1, got True"),
        (dict(drop_shards=2.0), "drop_shards must be an integer >= 1, got 2.0"),
        (dict(conv_impl="cudnn"), "conv_impl.*auto"),
        (dict(scan_blocks="yes"), "scan_blocks"),
        (dict(num_classes=0), "num_classes"),
        (dict(dtype=jnp.int32), "dtype"),
        (dict(bn_momentum=1.5), "bn_momentum.*1.5"),
        (dict(bn_epsilon=0.0), "bn_epsilon.*> 0"),
        (dict(depth=56), "depth is fixed"),
    ],
)
def test_invalid_fields_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.create("cifar_resnet20", **overrides)


def test_invalid_architecture_fields():
    with pytest.raises(ValueError, match="6n"):
        models.CifarResNet(depth=21)
    with pytest.raises(ValueError, match="depth=42"):
        models.ResNet(depth=42)
    with pytest.raises(ValueError, match="dropout_rate"):
        models.create("efficientnet_b0", dropout_rate=2.0)


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("cifar_resnet20", (8, 8, 3), "rank 4"),
        ("cifar_resnet20", (2, 8, 8, 1), "3 input channels"),
        ("cifar_resnet20", (2, 2, 2, 3), "at least 4x4"),
        ("efficientnet_b0", (1, 16, 16, 3), "at least 32x32"),
        ("resnet18", (1, 31, 64, 3), "at least 32x32"),
    ],
)
def test_wrong_input_is_a_clear_error(name, shape, match):
    model = models.create(name)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_training_without_dropout_key_is_a_clear_error():
    model = models.create("cifar_resnet20")
    x = tiny_images()
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="rngs"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def test_models_do_not_import_tensorflow():
    code = (
        "import sys, sdjax.models; "
        "assert not any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') "
        "for m in sys.modules), 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
