"""sdjax.models.prune: evaluating a model with residual blocks removed, for every family.

Tiny variants of each family, scanned (the default layout). Removing a block is checked against
a hand-built reference: the same network with the last layer of that block's residual branch
zeroed (so the branch adds exactly 0 and the shortcut is kept), evaluated normally.
"""

import functools

import chex
import jax
import numpy as np
import pytest

from sdjax import checkpoint, optim, steps
from sdjax.models import create, prune, scan_to_unrolled

# name -> (fields of a tiny variant, image size, {block number: path of its branch's last layer
# in the unrolled layout}).
FAMILIES = {
    "cifar_resnet20": (
        dict(widths=(4, 4, 8)),
        8,
        {4: "stage2_block1/residual/branch/bn2", 8: "stage3_block2/residual/branch/bn2"},
    ),
    "resnet18": (  # block 2 has a projection shortcut (stride 2), which is kept
        dict(width=4, num_classes=5),
        32,
        {2: "stage2_block0/residual/branch/bn2", 7: "stage4_block1/residual/branch/bn2"},
    ),
    "efficientnet_b0": (
        dict(width_coefficient=0.25, depth_coefficient=0.3, num_classes=5),
        32,
        {
            0: "stage1_block0/residual/branch/project_bn",
            6: "stage6_block1/residual/branch/project_bn",
        },
    ),
    "vit_ti16": (
        dict(patch_size=4, hidden_size=8, num_layers=3, num_heads=2, num_classes=5),
        8,
        {
            1: "encoder_block0/mlp_residual/branch/fc2",
            4: "encoder_block2/attn_residual/branch/proj",
        },
    ),
    "convnext_tiny": (
        dict(depths=(1, 3), widths=(4, 8), num_classes=5, layer_scale_init=1.0),
        8,
        {3: "stage2_block2/residual/branch/pw2"},
    ),
}


def tiny(name, **overrides):
    fields, size, _ = FAMILIES[name]
    model = create(name, conv_impl="xla", **{**fields, **overrides})
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    return model, images


def random_variables(model, images, seed=0):
    """Random host (NumPy) variables of ``model``'s structure: nothing is compiled (a jitted
    ``init`` costs seconds per model on CPU). Kernels ~ N(0, 1 / fan_in), norm scales and
    LayerScale around 1, biases, embeddings and BatchNorm means small, variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name, shape = path[-1].key, shape.shape
        if name == "kernel":
            return rng.normal(0, shape[-2] ** -0.5, shape).astype(np.float32)
        if name in ("scale", "layer_scale"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)

    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def variables_of(name):
    model, images = tiny(name)
    return random_variables(model, images)


def _zero_layer(tree, path):
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = jax.tree.map(np.zeros_like, node[leaf])


def hand_built_reference(model, variables, images, branch_paths):
    """The unrolled model evaluated with the last layer of each listed branch set to zero."""
    unrolled = jax.tree.map(np.array, scan_to_unrolled(variables))  # a copy
    for path in branch_paths:
        _zero_layer(unrolled["params"], path)
    return jax.jit(model.clone(scan_blocks=False).apply)(unrolled, images)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_no_block_removed_equals_evaluation_and_removing_equals_the_reference(name):
    model, images = tiny(name)
    variables = variables_of(name)
    evaluated = jax.jit(model.apply)(variables, images)
    chex.assert_trees_all_close(
        jax.jit(prune.pruned_apply(model))(variables, images), evaluated, rtol=1e-5, atol=1e-6
    )
    paths = FAMILIES[name][2]
    removed = jax.jit(prune.pruned_apply(model, list(paths)))(variables, images)
    want = hand_built_reference(model, variables, images, paths.values())
    chex.assert_trees_all_close(removed, want, rtol=1e-5, atol=1e-6)
    # The removed blocks mattered.
    assert np.max(np.abs(removed - evaluated)) > 1e-3 * np.max(np.abs(evaluated))


def test_unrolled_model_and_variables_work_too():
    model, images = tiny("cifar_resnet20", scan_blocks=False)
    scanned, _ = tiny("cifar_resnet20")
    variables = scan_to_unrolled(variables_of("cifar_resnet20"))
    got = jax.jit(prune.pruned_apply(model, [4, 8]))(variables, images)
    want = jax.jit(prune.pruned_apply(scanned, [4, 8]))(variables_of("cifar_resnet20"), images)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_prunable_blocks_and_removal_order():
    effnet, images = tiny("efficientnet_b0")
    assert prune.prunable_blocks(effnet, images.shape[1:]) == (0, 6)
    vit, _ = tiny("vit_ti16", final_drop_rate=0.2)
    assert prune.prunable_blocks(vit, (8, 8, 3)) == tuple(range(6))
    # Lowest survival first: the last transformer block's two branches (rate 0.2), then ...
    assert prune.removal_order(vit) == [5, 4, 3, 2, 1, 0]
    cifar, _ = tiny("cifar_resnet20")
    assert prune.removal_order(cifar)[:3] == [8, 7, 6]  # the paper's l / L: later drops more
    shuffled = prune.removal_order(cifar, seed=0)
    assert sorted(shuffled) == list(range(9)) and shuffled == prune.removal_order(cifar, seed=0)
    assert shuffled != prune.removal_order(cifar)


def test_bad_block_numbers_raise():
    model, images = tiny("efficientnet_b0")
    with pytest.raises(ValueError, match=r"block numbers in \[0, 8\)"):
        prune.pruned_apply(model, [8])
    with pytest.raises(ValueError, match=r"no residual branch.*prunable blocks: \[0, 6\]"):
        jax.eval_shape(prune.pruned_apply(model, [1]), variables_of("efficientnet_b0"), images)
    with pytest.raises(ValueError, match="evaluation only"):
        prune.pruned_apply(model)(variables_of("efficientnet_b0"), images, train=True)


def test_pruning_a_checkpoint_written_by_the_trainer(tmp_path, tiny_config):
    """The state sdjax.main saves (sdjax.checkpoint), restored into the train state's abstract
    structure as sdjax.trainer.build does, evaluates pruned like the in-memory variables."""
    config = tiny_config()
    model, images = tiny("cifar_resnet20")
    tx = optim.create(config.optim, 10, 5)
    variables = jax.device_put(variables_of("cifar_resnet20"))

    def init():  # steps.create_train_state, with the variables above instead of model.init
        return steps.TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=variables["batch_stats"],
            ema_params={},
        )

    state = init()
    model_config = {"name": "cifar_resnet20"}
    writer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), 1, model_config)
    writer.save(3, state, {"best_accuracy": 0.0})
    writer.close()
    reader = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), 1, model_config)
    restored, _ = reader.restore(jax.eval_shape(init))
    reader.close()
    apply = jax.jit(prune.pruned_apply(model, [8, 7]))
    got = apply({"params": restored.params, "batch_stats": restored.batch_stats}, images)
    want = apply({"params": state.params, "batch_stats": state.batch_stats}, images)
    chex.assert_trees_all_close(got, want)
