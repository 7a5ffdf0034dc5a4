"""The paper's recipe (its Torch code: main.lua, cifar-dataset.lua, ResidualDrop.lua), item by
item, and sdjax's earlier choice still selectable: validation split and best-validation results,
normalisation, stride-2 padding, initialisation, the last partial batch and lr drops by epoch."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import models, optim
from sdjax.data import augment, pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_MODEL = dict(
    conv_padding="symmetric",
    conv_init="he_fan_in",
    head_init="torch_linear",
    bn_scale_init="uniform",
)


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ---------------------------------------------------------------------------------------------
# Configs: the paper's recipe is the default, sdjax's earlier one is `recipe=sdjax`.


@pytest.mark.parametrize(
    "name, validation, boundaries",
    [
        ("cifar10_sd", 5000, (0.5, 0.75)),
        ("cifar10_constant", 5000, (0.5, 0.75)),
        ("cifar100_sd", 5000, (0.5, 0.75)),
        ("svhn_sd", 6000, (0.6, 0.7)),
        ("cifar10_resnet1202_sd", 5000, (0.5, 0.75)),
    ],
)
def test_paper_configs_default_to_the_paper_recipe(name, validation, boundaries):
    config = load(name)
    assert config.input.validation_size == validation
    assert config.input.normalization == "pixel_mean_global_std" and config.input.normalize
    assert config.input.drop_remainder is False
    assert config.optim.lr_schedule == "epoch_step" and tuple(config.optim.boundaries) == boundaries
    assert {k: config.model[k] for k in PAPER_MODEL} == PAPER_MODEL
    assert config.train.eval_every_epochs == 1
    config_lib.validate_fields(config)
    old = load(name, "recipe=sdjax")
    assert old.input.validation_size == 0 and old.input.normalization == "per_channel"
    assert old.input.drop_remainder is True and old.optim.lr_schedule == "step"
    assert (old.model.conv_padding, old.model.conv_init) == ("same", "he_fan_out")
    assert (old.model.head_init, old.model.bn_scale_init) == ("lecun_normal", "ones")


def test_recipe_argument_applies_first_and_rejects_unknown_names():
    config = load("cifar10_sd", "validation_size=1000,recipe=sdjax")
    assert config.input.validation_size == 1000  # the other keys apply on top of the recipe
    with pytest.raises(ValueError, match=r"config.recipe='torch' is invalid"):
        load("cifar10_sd", "recipe=torch")


def test_new_fields_are_checked():
    config = config_lib.default_config()
    config.input.normalization = "per_image"
    with pytest.raises(ValueError, match="input.normalization='per_image'"):
        config_lib.validate_fields(config)
    config = config_lib.default_config()
    config.optim.lr_schedule = "epochs"
    with pytest.raises(ValueError, match="optim.lr_schedule='epochs'"):
        config_lib.validate_fields(config)
    config = config_lib.default_config()
    config.input.npz_path = "cifar10.tar"
    with pytest.raises(ValueError, match="input.npz_path='cifar10.tar'"):
        config_lib.validate_fields(config)
    with pytest.raises(ValueError, match="conv_padding='torch' is not valid"):
        models.create("cifar_resnet20", conv_padding="torch")


# ---------------------------------------------------------------------------------------------
# (e) The learning rate by epoch; the last partial batch kept.


@pytest.mark.parametrize(
    "epochs, boundaries, changes",
    [(500, (0.5, 0.75), (250, 375)), (50, (0.6, 0.7), (30, 35)), (7, (0.5, 0.75), (4, 6))],
)
def test_epoch_step_schedule_follows_main_lua(epochs, boundaries, changes):
    """Lua: ``if epochCounter < maxEpochs * b1 then 0.1 elseif < maxEpochs * b2 then 0.01 else
    0.001`` with the 1-based epochCounter; the rate is constant within an epoch."""
    steps_per_epoch = 11  # e.g. 1,401 examples in batches of 128: 10 full batches and one of 121
    schedule = optim.epoch_step_schedule(0.1, boundaries, 0.1, epochs, steps_per_epoch)
    steps = np.arange(epochs * steps_per_epoch)
    rates = np.asarray(jax.vmap(schedule)(steps))
    counter = steps // steps_per_epoch + 1
    expected = np.where(
        counter < epochs * boundaries[0],
        0.1,
        np.where(counter < epochs * boundaries[1], 0.01, 0.001),
    )
    np.testing.assert_allclose(rates, expected.astype(np.float32), rtol=0)
    first = [int(counter[np.argmax(rates < r)]) for r in (0.05, 0.005)]
    assert tuple(first) == changes


def test_epoch_step_schedule_is_selected_by_the_config_and_counts_partial_batches():
    config = load("cifar10_sd").optim
    steps_per_epoch = pipeline.steps_per_epoch(45000, 128, drop_remainder=False)
    assert steps_per_epoch == 352  # 351 batches of 128 and one of 72
    schedule = optim.learning_rate_schedule(config, 500 * steps_per_epoch, steps_per_epoch)
    assert float(schedule(249 * steps_per_epoch - 1)) == pytest.approx(0.1)
    assert float(schedule(249 * steps_per_epoch)) == pytest.approx(0.01)  # epoch 250
    assert float(schedule(374 * steps_per_epoch)) == pytest.approx(0.001)  # epoch 375
    step_schedule = optim.learning_rate_schedule(load("cifar10_sd", "recipe=sdjax").optim, 1000, 10)
    assert float(step_schedule(499)) == pytest.approx(0.1)
    assert float(step_schedule(500)) == pytest.approx(0.01)


def _synthetic_input(**overrides):
    config = config_lib.default_config().input
    config.dataset = "synthetic"
    config.synthetic_num_train = 300
    config.synthetic_image_shape = (6, 5, 3)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_partial_last_batch_is_kept_and_hosts_split_it():
    ds = data_lib.create(_synthetic_input(drop_remainder=False))
    assert ds.steps_per_epoch(128) == 3 and ds.last_batch_size(128) == 44
    for epoch in (0, 1):
        batches = [ds.train_batch(4, epoch * 3 + i, 128)["label"] for i in range(3)]
        assert [len(b) for b in batches] == [128, 128, 44]
        idx = np.concatenate(
            [
                pipeline.batch_indices(4, epoch * 3 + i, 128, 300, drop_remainder=False)
                for i in range(3)
            ]
        )
        np.testing.assert_array_equal(np.sort(idx), np.arange(300))  # every example once
        np.testing.assert_array_equal(idx, pipeline.epoch_permutation(4, epoch, 300))
    halves = [ds.train_batch(4, 2, 128, process_index=i, process_count=2) for i in range(2)]
    assert [len(h["label"]) for h in halves] == [22, 22]
    np.testing.assert_array_equal(
        np.concatenate([h["image"] for h in halves]), ds.train_batch(4, 2, 128)["image"]
    )
    dropped = data_lib.create(_synthetic_input())
    assert dropped.steps_per_epoch(128) == 2 and dropped.last_batch_size(128) == 128


# ---------------------------------------------------------------------------------------------
# (a) and (b) The 45k/5k-style split, and the paper's normalisation.


def test_pixel_mean_and_global_std_come_from_the_training_part():
    """cifar-dataset.lua: ``mean = data:mean(1)`` (an image), ``std = data:std()`` (one number,
    unbiased, of the raw values), both of the 45k training part, applied to all three parts."""
    ds = data_lib.create(
        _synthetic_input(validation_size=60, normalization="pixel_mean_global_std")
    )
    assert len(ds.train[1]) == 240 and len(ds.val[1]) == 60
    raw = ds.train[0].astype(np.float64)
    assert ds.mean.shape == (6, 5, 3) and ds.mean.dtype == np.float32
    np.testing.assert_allclose(ds.mean, raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, [raw.std(ddof=1)], rtol=1e-12)
    both = np.concatenate([ds.train[0], ds.val[0]]).astype(np.float64)
    assert abs(both.std(ddof=1) - raw.std(ddof=1)) > 1e-6 * raw.std()  # the test can tell
    x = np.asarray(augment.normalize(ds.train[0], ds.mean, ds.std))
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)  # zero mean at every pixel
    per_channel = data_lib.create(_synthetic_input(validation_size=60))
    assert len(per_channel.mean) == 3 and len(per_channel.std) == 3


def test_translation_fills_with_the_mean_pixel():
    """Normalise first, then pad with zeros: the fill is the mean image's value (0 after
    normalisation), as the Lua code zeroes the input and copies the normalised window."""
    ds = data_lib.create(_synthetic_input(normalization="pixel_mean_global_std"))
    kwargs = dict(ds.augment_kwargs(), crop_padding=4, flip=False)
    images = jnp.asarray(ds.train[0][:64])
    out = np.asarray(augment.preprocess(images, jax.random.key(3), **kwargs))
    normalised = np.asarray(augment.normalize(images, ds.mean, ds.std))
    pad = np.pad(normalised, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for b in range(64):
        windows = [
            np.allclose(out[b], pad[b, dy : dy + 6, dx : dx + 5])
            for dy in range(9)
            for dx in range(9)
        ]
        assert any(windows)
    evaluated = np.asarray(augment.preprocess(images, None, **kwargs))
    np.testing.assert_allclose(evaluated, normalised)


# ---------------------------------------------------------------------------------------------
# (c) and (d) Padding and initialisation; parameter counts unchanged.


def _init(**kwargs):
    model = models.create("cifar_resnet20", conv_impl="xla", scan_blocks=False, **kwargs)
    return model, model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "name, count", [("cifar_resnet20", 269_722), ("cifar_resnet110", 1_727_962)]
)
def test_parameter_counts_do_not_change_with_the_paper_init_and_padding(name, count):
    for kwargs in ({}, PAPER_MODEL):
        model = models.create(name, **kwargs)
        shapes = jax.eval_shape(
            lambda k, m=model: m.init({"params": k}, jnp.zeros((1, 32, 32, 3))), jax.random.key(0)
        )
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == count


def test_symmetric_padding_pads_stride_two_convolutions_one_on_each_side():
    model, variables = _init(conv_padding="symmetric")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    _, inter = model.apply(variables, x, capture_intermediates=True)
    conv = variables["params"]["stage2_block0"]["residual"]["branch"]["conv1"]["kernel"]
    stage1_out = inter["intermediates"]["stage1_block2"]["__call__"][0]
    ours = inter["intermediates"]["stage2_block0"]["residual"]["branch"]["conv1"]["__call__"][0]
    expected = jax.lax.conv_general_dilated(
        stage1_out, conv, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    same = jax.lax.conv_general_dilated(
        stage1_out, conv, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert not np.allclose(ours, same, atol=1e-3)  # "SAME" pads 0/1: another alignment


def test_paper_init_kaiming_fan_in_torch_linear_and_uniform_batchnorm_scale():
    _, old = _init()
    _, new = _init(**PAPER_MODEL)
    p_old, p_new = old["params"], new["params"]
    # The first stride-2 conv: fan-in 3*3*16 = 144, fan-out 3*3*32 = 288.
    k_new = p_new["stage2_block0"]["residual"]["branch"]["conv1"]["kernel"]
    k_old = p_old["stage2_block0"]["residual"]["branch"]["conv1"]["kernel"]
    assert float(jnp.std(k_new)) == pytest.approx(np.sqrt(2 / 144), rel=0.05)
    assert float(jnp.std(k_old)) == pytest.approx(np.sqrt(2 / 288), rel=0.05)
    head = p_new["head"]
    bound = 1 / np.sqrt(64)
    for leaf in (head["kernel"], head["bias"]):
        assert float(jnp.max(jnp.abs(leaf))) <= bound and float(jnp.min(jnp.abs(leaf))) > 0
    # Uniform in +-bound: std bound / sqrt(3) (640 kernel values).
    assert float(jnp.std(head["kernel"])) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert float(jnp.max(jnp.abs(p_old["head"]["bias"]))) == 0.0
    scales = jnp.concatenate(
        [
            x.ravel()
            for path, x in jax.tree_util.tree_leaves_with_path(p_new)
            if path[-1].key == "scale"
        ]
    )
    assert 0.0 <= float(scales.min()) and float(scales.max()) < 1.0 and float(scales.std()) > 0.2
    assert float(p_old["stem_bn"]["scale"].min()) == 1.0
    for tree in (p_old, p_new):
        assert not [
            path
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)
            if "bias" in str(path[-1]) and "conv" in str(path)
        ]


# ---------------------------------------------------------------------------------------------
# (a) end to end: validation and test every epoch, best-validation and last-epoch test error.


def test_tiny_run_of_the_paper_recipe_writes_best_validation_and_last_epoch_errors(tmp_path):
    from sdjax import loop

    config = load(
        "cifar10_sd",
        "model=cifar_resnet20,model.widths=4;4;8,model.scan_blocks=false,dataset=synthetic,"
        "validation_size=40,batch_size=64,epochs=3,train.eval_batch_size=128,"
        "train.progress_bar=false,train.checkpoint_every_steps=100",
    )
    config.input.synthetic_image_shape = (8, 8, 3)
    config.input.synthetic_num_train = 200  # 160 train: batches of 64, 64 and 32
    config.input.synthetic_num_test = 100
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 9 and results["epochs"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3] and all("test_accuracy" in r for r in evals)
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equal bests
    assert results["best_val_epoch"] == best["epoch"]
    assert results["test_error_at_best_val"] == pytest.approx(1 - best["test_accuracy"])
    assert results["test_error"] == pytest.approx(1 - evals[-1]["test_accuracy"])
    rates = {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}
    assert rates[3] == pytest.approx(0.1) and rates[9] == pytest.approx(0.001)


def test_checkpoints_written_before_the_new_fields_resume_with_their_old_values():
    from sdjax import trainer

    current = config_lib.apply_recipe(load("cifar10_sd"), "sdjax").to_dict()
    saved = json.loads(json.dumps(current, default=str))
    for path in config_lib.ADDED_FIELDS:
        section, leaf = path.split(".")
        del saved[section][leaf]
    del saved["input"]["npz_path"], saved["train"]["tensorboard"]  # harmless fields
    current = json.loads(json.dumps(current, default=str))
    assert trainer.trajectory_changes(saved, current) == []
    paper = json.loads(json.dumps(load("cifar10_sd").to_dict(), default=str))
    changes = trainer.trajectory_changes(saved, paper)
    assert set(changes) == {
        "input.normalization",
        "input.drop_remainder",
        "model.conv_padding",
        "model.conv_init",
        "model.head_init",
        "model.bn_scale_init",
        "input.validation_size",
        "optim.lr_schedule",
    }


def test_train_size_is_a_fixed_random_subset_of_the_part_left_after_validation(tiny_config):
    config = tiny_config()
    config.input.validation_size = 300
    full = data_lib.create(config.input)
    config.input.train_size = 256
    subsets = []
    for seed in (0, 1):  # the run's seed does not move the subset; split_seed does
        config.seed = seed
        subsets.append(data_lib.create(config.input))
    small = subsets[0]
    rows = {x.tobytes() for x in full.train[0]}
    assert len(small.train[1]) == 256 and len(full.train[1]) == 1437 - 300
    assert all(x.tobytes() in rows for x in small.train[0])  # drawn from the training part
    np.testing.assert_array_equal(small.val[0], full.val[0])  # validation unchanged
    np.testing.assert_array_equal(small.train[0], subsets[1].train[0])
    assert not np.array_equal(small.train[0], full.train[0][:256])  # not the stored prefix
    assert small.steps_per_epoch(32) == 8
    config.input.split_seed = 1
    assert not np.array_equal(data_lib.create(config.input).train[0], small.train[0])
    mean, _ = pipeline.normalization_stats(small.train[0])
    np.testing.assert_allclose(small.mean, mean)  # statistics of the subset


def test_train_size_larger_than_the_training_part_is_refused(tiny_config, tmp_path):
    from sdjax import loop  # noqa: PLC0415

    config = tiny_config("validation_size=300,train_size=1200")
    with pytest.raises(ValueError, match=r"config.input.train_size=1200 is invalid.*1137"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
