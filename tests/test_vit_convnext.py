"""ViT/DeiT and ConvNeXt: parameter counts, timm's rates, scan vs unrolled, per-branch draws,
batch mode's conditionals, row-subset gradients, NNX through the bridge, export for TPU/CUDA.

Full-size models are only traced abstractly (``jax.eval_shape``); everything that runs uses tiny
variants on 8x8 images.
"""

import functools
import importlib.util
import pathlib
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import config as config_lib
from sdjax import models, trainer
from sdjax.models import convnext, ln_base, prune, stages, vit

TINY = {
    "vit_ti16": dict(patch_size=4, hidden_size=8, num_layers=3, num_heads=2),
    # LayerScale 1.0 instead of 1e-6, so that the branches change the logits visibly.
    "convnext_tiny": dict(depths=(1, 3), widths=(4, 8), layer_scale_init=1.0),
}
IMAGES = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
LABELS = jnp.array([0, 1, 2, 1])


def tiny(name, **overrides):
    fields = dict(num_classes=3, final_drop_rate=0.5, conv_impl="xla", **TINY[name])
    return models.create(name, **{**fields, **overrides})


@functools.cache
def tiny_params(name):
    """Random host parameters (a jitted ``init`` costs seconds on CPU): kernels N(0, 1/fan_in),
    LayerNorm scales and LayerScale around 1, biases and embeddings small."""
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        name, shape = path[-1].key, shape.shape
        if name == "kernel":
            return rng.normal(0, shape[-2] ** -0.5, shape).astype(np.float32)
        if name in ("scale", "layer_scale"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)

    shapes = jax.eval_shape(tiny(name).init, jax.random.key(0), IMAGES)["params"]
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def count_params(model, size=224):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


# timm: deit_{tiny,small,base}_patch16_224 and convnext_{tiny,small,base}, 1000 classes.
PARAMETER_COUNTS = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
}


def test_published_parameter_counts():
    counts = {name: count_params(models.create(name)) for name in PARAMETER_COUNTS}
    assert counts == PARAMETER_COUNTS


def test_unrolled_layout_has_the_same_parameters():
    model = models.create("vit_s16", scan_blocks=False)
    assert count_params(model) == 22_050_664


def test_defaults_and_layer_scale():
    model = models.create("vit_s16")
    assert (model.final_drop_rate, model.drop_mode, model.scale_by_keep, model.scan_blocks) == (
        0.1,
        "row",
        True,
        True,
    )
    assert (model.num_layers, model.num_blocks, model.num_classes) == (12, 24, 1000)
    # LayerScale (CaiT/DINOv2): one D-vector per branch, 2 * 12 * 384 parameters more.
    with_ls = models.create("vit_s16", layer_scale_init=1e-5)
    assert count_params(with_ls) == 22_050_664 + 2 * 12 * 384
    assert models.create("convnext_tiny").layer_scale_init == 1e-6
    assert count_params(models.create("convnext_tiny", layer_scale_init=None)) == (
        28_589_128 - 96 * 3 - 192 * 3 - 384 * 9 - 768 * 3
    )


def test_linear_schedule_is_timm_linspace_not_the_papers_rule():
    model = models.create("vit_s16", final_drop_rate=0.1)
    np.testing.assert_allclose(model.layer_rates(), np.linspace(0, 0.1, 12), atol=1e-15)
    # Attention and MLP branch of block i share block i's rate.
    assert model.effective_block_rates() == tuple(np.repeat(model.layer_rates(), 2))
    paper = models.create("cifar_resnet20", final_drop_rate=0.1)
    assert paper.block_rates(12)[0] == pytest.approx(0.1 / 12)  # l / L: the first block drops
    assert model.layer_rates()[0] == 0.0 and model.layer_rates()[-1] == 0.1
    # ConvNeXt: one linspace over all blocks of all stages, in forward order.
    cnx = models.create("convnext_tiny", final_drop_rate=0.4)
    np.testing.assert_allclose(cnx.effective_block_rates(), np.linspace(0, 0.4, 18), atol=1e-15)
    assert models.create("vit_s16", drop_schedule="uniform").layer_rates() == (0.1,) * 12
    assert ln_base.linspace_rates(1, 0.3) == (0.0,) and ln_base.linspace_rates(0, 0.3) == ()


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_heads=5), "divisible by num_heads"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(layer_scale_init=-1.0), "layer_scale_init"),
        (dict(drop_mode="rows"), "drop_mode"),
    ],
)
def test_invalid_fields_raise_at_construction(fields, match):
    with pytest.raises(ValueError, match=match):
        models.create("vit_s16", **fields)


def test_invalid_convnext_fields_and_inputs():
    with pytest.raises(ValueError, match="same length"):
        models.create("convnext_tiny", depths=(3, 3), widths=(96,))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        jax.eval_shape(models.create("vit_s16").init, jax.random.key(0), jnp.zeros((1, 40, 40, 3)))


def _train_logits(model, params, key):
    return model.apply({"params": params}, IMAGES, train=True, rngs={"dropout": key})


@pytest.mark.parametrize(
    "name, mode",
    [
        ("vit_ti16", "row"),  # ViT batch mode: test_the_model_drops_the_branches_batch_gates_lists
        ("vit_ti16", "row_subset"),
        ("convnext_tiny", "batch"),
        ("convnext_tiny", "row_subset"),
    ],
)
def test_scan_equals_unrolled(name, mode):
    scanned = tiny(name, drop_mode=mode)
    unrolled = scanned.clone(scan_blocks=False)
    params = tiny_params(name)
    key = jax.random.key(7)
    got = jax.jit(functools.partial(_train_logits, scanned))(params, key)
    want = jax.jit(functools.partial(_train_logits, unrolled))(stages.scan_to_unrolled(params), key)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    evaluated = jax.jit(scanned.apply)({"params": params}, IMAGES)
    assert not np.allclose(got, evaluated, atol=1e-3)  # something was dropped


def test_attention_and_mlp_branches_draw_independent_gates():
    model = tiny("vit_ti16", drop_mode="batch", drop_schedule="uniform")
    keys = jax.random.split(jax.random.key(0), 4000)
    gates = np.asarray(jax.vmap(functools.partial(models.batch_gates, model))(keys))
    attn, mlp = gates[:, 0::2], gates[:, 1::2]
    # Independent Bernoulli(0.5) gates: each kept half the time, equal half the time.
    np.testing.assert_allclose(attn.mean(0), 0.5, atol=0.04)
    np.testing.assert_allclose((attn == mlp).mean(0), 0.5, atol=0.04)
    np.testing.assert_allclose(np.corrcoef(attn[:, 0], mlp[:, 0])[0, 1], 0.0, atol=0.05)


def test_the_model_drops_the_branches_batch_gates_lists():
    """A batch-mode step with eval-time scaling == the eval net with exactly the gated-off
    branches removed (sdjax.models.prune), for a key whose attention and MLP gates differ."""
    model = tiny("vit_ti16", drop_mode="batch", scale_by_keep=False)
    params = tiny_params("vit_ti16")
    for seed in range(100):
        key = jax.random.key(seed)
        gates = np.asarray(models.batch_gates(model, key))
        if np.any(gates[0::2] != gates[1::2]) and not gates.all():
            break
    removed = [b for b, kept in enumerate(gates) if not kept]
    pruned = prune.pruned_apply(model.clone(scale_by_keep=True), removed)
    want = jax.jit(pruned)({"params": params}, IMAGES)
    got = jax.jit(functools.partial(_train_logits, model))(params, key)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def _primitive_names(jaxpr):
    """The primitives of ``jaxpr`` and, recursively, of its sub-jaxprs (scan/cond bodies)."""
    yield from (eqn.primitive.name for eqn in jaxpr.eqns)
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _primitive_names(sub)


def _equations(jaxpr):
    """``(primitive name, dtypes of its array inputs)`` of every equation, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, {v.aval.dtype for v in eqn.invars if hasattr(v.aval, "dtype")}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _equations(sub)


@pytest.mark.parametrize("name", list(TINY))
def test_batch_mode_compiles_to_conditionals(name):
    def loss(model, params):
        return jnp.sum(_train_logits(model, params, jax.random.key(3)))

    params = tiny_params(name)
    batch = functools.partial(loss, tiny(name, drop_mode="batch"))
    names = list(_primitive_names(jax.make_jaxpr(jax.grad(batch))(params).jaxpr))
    assert "cond" in names and "scan" in names
    hlo = jax.jit(jax.grad(batch)).lower(params).as_text()
    assert "case" in hlo or "conditional" in hlo
    row = functools.partial(loss, tiny(name, drop_mode="row"))
    assert "cond" not in set(_primitive_names(jax.make_jaxpr(jax.grad(row))(params).jaxpr))


class _MaskedMixin:
    """The model with its row-subset branches run on every sample and masked outside the subset
    (``DropPathResidual(skip_compute=False)``): the masked equivalent, same key, same subsets."""

    def block_defs(self, train):
        defs = super().block_defs(train)
        defs["drop_path"] = functools.partial(defs["drop_path"], skip_compute=False)
        return defs


class MaskedViT(_MaskedMixin, vit.ViT):
    pass


class MaskedConvNeXt(_MaskedMixin, convnext.ConvNeXt):
    pass


@pytest.mark.parametrize(
    "name, masked_cls", [("vit_ti16", MaskedViT), ("convnext_tiny", MaskedConvNeXt)]
)
def test_row_subset_gradients_equal_the_masked_equivalent(name, masked_cls):
    subset = tiny(name, drop_mode="row_subset", final_drop_rate=0.6)
    fields = {f: getattr(subset, f) for f in models.dataclass_fields(type(subset))}
    masked = masked_cls(**fields)
    _assert_same_loss_and_grads(subset, masked, tiny_params(name), jax.random.key(11))


def _assert_same_loss_and_grads(model_a, model_b, params, key):
    """The training loss of the two models and its gradients agree (same params and key)."""

    def loss(model, params):
        logits = _train_logits(model, params, key)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, LABELS))

    got = jax.jit(jax.value_and_grad(functools.partial(loss, model_a)))(params)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, model_b)))(params)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_subset_groups_minimise_the_padded_work():
    rates = [0.4 * b / 11 for b in range(1, 12)]  # ViT-S/16's scanned blocks at rate 0.4
    assert stages.subset_groups(rates, 4) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert stages.subset_groups(rates, 1) == [(0, 11)]
    assert stages.subset_groups([0.2] * 5, 4) == [(0, 5)]  # equal rates: one group
    assert stages.subset_groups([], 3) == []

    def cost(groups, rates):
        return sum((hi - lo) * (1 - min(rates[lo:hi])) for lo, hi in groups)

    rng = np.random.default_rng(0)
    for _ in range(20):  # against every split into at most 3 contiguous groups
        rates = list(rng.uniform(0, 1, 6))
        got = stages.subset_groups(rates, 3)
        assert got[0][0] == 0 and got[-1][1] == 6 and len(got) <= 3
        assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
        cuts = [(i, j) for i in range(1, 6) for j in range(i, 6)]
        best = min(
            cost([(0, i), (i, j), (j, 6)] if i < j else [(0, i), (i, 6)], rates) for i, j in cuts
        )
        assert cost(got, rates) <= min(best, cost([(0, 6)], rates)) + 1e-9


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("name", list(TINY))
def test_grouped_subset_scan_equals_one_scan(name, remat):
    """Row-subset with the scanned blocks in groups (the default) computes what one padded scan
    computes, values and gradients, and the step really has one scan per group (with
    ``remat`` too: the groups' ``min_rate`` stays a static argument)."""
    grouped = tiny(name, drop_mode="row_subset", final_drop_rate=0.6, remat=remat)
    single = grouped.clone(subset_scan_groups=1)
    params, key = tiny_params(name), jax.random.key(5)
    _assert_same_loss_and_grads(grouped, single, params, key)

    def scans(model):
        jaxpr = jax.make_jaxpr(functools.partial(_train_logits, model))(params, key).jaxpr
        return sum(p == "scan" for p in _primitive_names(jaxpr))

    assert scans(single) == 1
    assert scans(grouped) == 2  # the last stage's 2 scanned blocks keep different subset sizes


@pytest.mark.parametrize("name", list(TINY))
def test_bf16_compute_with_float32_parameters(name):
    model = tiny(name, dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    variables = {"params": tiny_params(name)}
    assert jax.eval_shape(model.apply, variables, IMAGES).dtype == jnp.float32  # the logits
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=True))(
        variables, IMAGES, rngs={"dropout": jax.random.key(0)}
    ).jaxpr
    products = [
        dtypes
        for name, dtypes in _equations(jaxpr)
        if name in ("dot_general", "conv_general_dilated")
    ]
    assert products and all(dtypes == {jnp.dtype(jnp.bfloat16)} for dtypes in products)


@pytest.mark.parametrize("name", list(TINY))
def test_nnx_bridge_training_step_uses_the_dropout_stream(name):
    module = nnx.bridge.ToNNX(tiny(name), rngs=nnx.Rngs(params=0, dropout=1))
    nnx.jit(lambda module, images: nnx.bridge.lazy_init(module, images) and None)(module, IMAGES)
    dropout_count = int(module.to_nnx__rngs.dropout.count.get_value())
    optimizer = nnx.Optimizer(module, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(module, optimizer, images, labels):
        def loss_fn(module):
            logits = module(images, train=True)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        loss, grads = nnx.value_and_grad(loss_fn)(module)
        optimizer.update(module, grads)
        return loss

    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    losses = [float(train_step(module, optimizer, IMAGES, LABELS)) for _ in range(3)]
    after = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    assert all(np.isfinite(losses))
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )
    # The dropout stream advanced once per step (a new key, new drop masks, every step).
    assert int(module.to_nnx__rngs.dropout.count.get_value()) == dropout_count + 3


_CPU_ONLY_TARGET = re.compile(r"custom_call @(\w*(onednn|cpu|lapack|ducc)\w*)", re.IGNORECASE)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("mode", ["batch", "row_subset"])
def test_export_for_tpu_and_cuda_has_no_cpu_only_custom_call(name, mode):
    model = tiny(name, drop_mode=mode, conv_impl="auto", dtype=jnp.bfloat16)
    params = tiny_params(name)

    def grad(params, images, key):
        return jax.grad(lambda p: jnp.sum(_train_logits_of(model, p, images, key)))(params)

    exported = jax.export.export(jax.jit(grad), platforms=["tpu", "cuda"])(
        params, IMAGES, jax.random.key(0)
    )
    text = exported.mlir_module()
    assert _CPU_ONLY_TARGET.findall(text) == []
    assert "sdjax_onednn" not in text


def _train_logits_of(model, params, images, key):
    return model.apply({"params": params}, images, train=True, rngs={"dropout": key})


def _load_config(name, arg=None):
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("mode", ["row", "batch", "row_subset"])
def test_digits_vit_config_validates_in_each_mode(mode):
    config = _load_config("digits_vit", f"mode={mode}")
    config_lib.validate_fields(config)
    model = trainer.create_model(config)
    assert (type(model), model.drop_mode, model.input_channels) == (vit.ViT, mode, 1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    assert shapes["params"]["pos_embed"].shape == (1, 17, 64)  # 16 patches of 2x2 + class


def test_deit_s_config_is_the_recipe():
    config = _load_config("imagenet_deit_s")
    model = trainer.create_model(config)
    assert count_params(model) == 22_050_664 and model.dtype == jnp.bfloat16
    assert model.layer_rates()[-1] == 0.1 and model.drop_mode == "row" and model.scale_by_keep
    optim_config = config.optim
    assert (optim_config.optimizer, optim_config.learning_rate, optim_config.weight_decay) == (
        "adamw",
        1e-3,
        0.05,
    )
    assert (optim_config.lr_schedule, optim_config.warmup_epochs) == ("cosine", 5.0)
    assert optim_config.label_smoothing == 0.1
    if "adamw" in config_lib.OPTIMIZERS:
        config_lib.validate_fields(config)
    else:  # AdamW is not in sdjax.optim yet: only that field is rejected
        with pytest.raises(ValueError, match="optim.optimizer"):
            config_lib.validate_fields(config)
        config_lib.validate_fields(_load_config("imagenet_deit_s", "optim.optimizer=rmsprop"))


def _from_torch(module, kind):
    """A timm/torch layer's parameters in the sdjax layout (``kind``: linear, norm or conv)."""
    weight = jnp.asarray(module.weight.detach().numpy())
    bias = jnp.asarray(module.bias.detach().numpy())
    if kind == "norm":
        return {"scale": weight, "bias": bias}
    return {"kernel": weight.T if kind == "linear" else weight.transpose(2, 3, 1, 0), "bias": bias}


def _perturbed(torch, module):
    """``module`` in eval mode with every parameter moved off its initial value (seeded)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return module.eval()


def test_logits_equal_timm_with_the_same_weights():
    """Forward parity with timm's VisionTransformer (LayerScale on) and ConvNeXt, small sizes."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    nhwc = jnp.asarray(images.numpy()).transpose(0, 2, 3, 1)

    peer = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7,
        init_values=0.3,
    )  # fmt: skip
    peer = _perturbed(torch, peer)
    params = {
        "patch_embed": _from_torch(peer.patch_embed.proj, "conv"),
        "cls_token": jnp.asarray(peer.cls_token.detach().numpy()),
        "pos_embed": jnp.asarray(peer.pos_embed.detach().numpy()),
        "encoder_norm": _from_torch(peer.norm, "norm"),
        "head": _from_torch(peer.head, "linear"),
    }
    for i, block in enumerate(peer.blocks):
        attn = {
            "norm": _from_torch(block.norm1, "norm"),
            "qkv": _from_torch(block.attn.qkv, "linear"),
            "proj": _from_torch(block.attn.proj, "linear"),
            "layer_scale": jnp.asarray(block.ls1.gamma.detach().numpy()),
        }
        mlp = {
            "norm": _from_torch(block.norm2, "norm"),
            "fc1": _from_torch(block.mlp.fc1, "linear"),
            "fc2": _from_torch(block.mlp.fc2, "linear"),
            "layer_scale": jnp.asarray(block.ls2.gamma.detach().numpy()),
        }
        params[f"encoder_block{i}"] = {
            "attn_residual": {"branch": attn},
            "mlp_residual": {"branch": mlp},
        }
    model = models.create(
        "vit_ti16", patch_size=8, hidden_size=32, num_layers=3, num_heads=2, num_classes=7,
        layer_scale_init=0.3, conv_impl="xla",
    )  # fmt: skip
    got = model.apply({"params": stages.unrolled_to_scan(params)}, nhwc)
    np.testing.assert_allclose(got, peer(images).detach().numpy(), atol=2e-6)

    peer = timm.models.convnext.ConvNeXt(
        depths=(1, 1, 2, 1), dims=(8, 16, 16, 32), num_classes=7, ls_init_value=0.5
    )
    peer = _perturbed(torch, peer)
    params = {
        "stem_conv": _from_torch(peer.stem[0], "conv"),
        "stem_norm": _from_torch(peer.stem[1], "norm"),
        "head_norm": _from_torch(peer.head.norm, "norm"),
        "head": _from_torch(peer.head.fc, "linear"),
    }
    for s, stage in enumerate(peer.stages):
        if s > 0:
            params[f"downsample{s + 1}_norm"] = _from_torch(stage.downsample[0], "norm")
            params[f"downsample{s + 1}_conv"] = _from_torch(stage.downsample[1], "conv")
        for j, block in enumerate(stage.blocks):
            branch = {
                "dw_conv": _from_torch(block.conv_dw, "conv"),
                "norm": _from_torch(block.norm, "norm"),
                "pw1": _from_torch(block.mlp.fc1, "linear"),
                "pw2": _from_torch(block.mlp.fc2, "linear"),
                "layer_scale": jnp.asarray(block.gamma.detach().numpy()),
            }
            params[f"stage{s + 1}_block{j}"] = {"residual": {"branch": branch}}
    model = models.create(
        "convnext_tiny", depths=(1, 1, 2, 1), widths=(8, 16, 16, 32), num_classes=7,
        layer_scale_init=0.5, conv_impl="xla",
    )  # fmt: skip
    got = model.apply({"params": stages.unrolled_to_scan(params)}, nhwc)
    np.testing.assert_allclose(got, peer(images).detach().numpy(), atol=2e-6)
