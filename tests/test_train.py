"""Tests of sdjax.train: short end-to-end runs, resume, NaN stop, checkpoints, validation errors."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sdjax import config_utils, models, optim, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
    """Digits with a narrow ResNet-20: compiles and runs a step in well under a second."""
    sys.path.insert(0, REPO)
    from configs import digits_sd  # noqa: PLC0415

    config = digits_sd.get_config()
    config.model.name = "cifar_resnet20"
    config.model.widths = (4, 4, 8)
    config.model.scan_blocks = False
    config.train.batch_size = 32
    config.train.eval_batch_size = 360
    config.train.num_train_steps = 6
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 3
    config.train.progress_bar = False
    for k, v in train_overrides.items():
        config.train[k] = v
    return config


def _restore_params(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return state["state"]["params"]


def test_end_to_end_writes_results_metrics_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(tiny_config(), workdir)
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    for key in ("test_accuracy", "test_error", "train_time_s", "steps", "final_train_loss"):
        assert key in on_disk
    assert on_disk["steps"] == 6 and results["steps"] == 6
    assert math.isclose(on_disk["test_error"], 1 - on_disk["test_accuracy"])
    assert on_disk["config"]["model"]["name"] == "cifar_resnet20"
    assert "jax" in on_disk["versions"] and on_disk["devices"]["device_count"] >= 1
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {"train_loss", "learning_rate", "examples_per_s"} <= set(lines[0])
    # Batch-mode stochastic depth (digits_sd): the blocks each logged window computed, the mean
    # of the gates that the steps' dropout keys draw.
    config = tiny_config()
    model = train.create_model(config)
    train_key = jax.random.fold_in(jax.random.key(config.seed, impl=config.prng_impl), 1)
    logged = [x for x in lines if "train_loss" in x]
    assert [x["step"] for x in logged] == [2, 3, 4, 6]  # every 2 steps, and at the save at 3
    first = 0
    for x in logged:
        runs = [
            int(
                models.batch_gates(
                    model, jax.random.fold_in(jax.random.fold_in(train_key, s), 0)
                ).sum()
            )
            for s in range(first, x["step"])
        ]
        assert x["train_blocks_run"] == pytest.approx(np.mean(runs)), x
        first = x["step"]
    assert min(x["train_blocks_run"] for x in logged) < model.num_blocks == 9
    assert any("test_accuracy" in x for x in lines)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_preempted_run_resumes_bitwise_equal(tmp_path, monkeypatch):
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=100)
    config.input.validation_size = 100
    straight = str(tmp_path / "straight")
    full = train.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(train._Preemption, "reached", lambda self, step: step == 3)
    out = train.train_and_evaluate(config, resumed)
    assert out == {"preempted": True, "steps": 3}
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    monkeypatch.undo()
    again = train.train_and_evaluate(config, resumed)

    assert again["test_accuracy"] == full["test_accuracy"]
    assert again["best_val_accuracy"] == full["best_val_accuracy"]
    a, b = _restore_params(straight, 8), _restore_params(resumed, 8)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(num_train_steps=20, checkpoint_every_steps=1, log_every_steps=1)
    config.optim.learning_rate = 1e30
    config.optim.warmup_epochs = 0.0
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.train_and_evaluate(config, workdir)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    finite = [x["step"] for x in lines if isinstance(x.get("train_loss"), float)]
    assert steps and max(steps) <= max(finite, default=0)
    params = _restore_params(workdir, max(steps))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(num_train_steps=3), workdir)
    other = tiny_config(num_train_steps=6)
    other.model.name = "cifar_resnet32"
    with pytest.raises(ValueError, match="cifar_resnet20.*cifar_resnet32.*nothing was loaded"):
        train.train_and_evaluate(other, workdir)
    wider = tiny_config(num_train_steps=6)
    wider.model.widths = (4, 8, 8)
    with pytest.raises(ValueError, match="different parameter shapes"):
        train.train_and_evaluate(wider, workdir)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model.final_drop_rate", 1.5, "final_drop_rate"),
        ("model.final_drop_rate", float("nan"), "final_drop_rate"),
        ("model.name", "resnet9000", "model.name.*cifar_resnet110"),
        ("model.drop_mode", "rows", "drop_mode.*batch"),
        ("model.drop_schedule", "linaer", "drop_schedule.*linear"),
        ("input.dataset", "mnist", "input.dataset.*digits"),
        ("optim.optimizer", "adam", "optimizer.*sgd"),
        ("prng_impl", "philox", "prng_impl.*threefry2x32"),
        ("model.input_channels", 3, "images of shape \\(8, 8, 1\\)"),
        ("model.num_classes", 7, "num_classes.*10"),
        ("optim.learning_rate", -0.1, "learning_rate"),
        ("input.validation_size", 1437, "validation_size"),
    ],
)
def test_bad_config_values_raise_before_compiling(field, value, match, tmp_path):
    config = tiny_config()
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        config_utils.validate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_devices_and_unwritable_workdir(tmp_path):
    config = tiny_config()
    with pytest.raises(
        ValueError, match="batch_size=32.*multiple of the number of devices \\(3\\)"
    ):
        config_utils.validate(config, device_count=3)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="workdir .* is not writable"):
        config_utils.validate(config, str(blocker / "sub"))
    with pytest.raises(ValueError, match="dataset 'cifar100'.*tfds build"):
        config.input.dataset = "cifar100"
        config.model.num_classes = 100
        config.input.data_dir = str(tmp_path)
        config_utils.validate(config)


def test_arg_strings_and_schedules():
    config = config_utils.apply_arg(
        config_utils.default_config(), "final_drop_rate=0.3,mode=row,steps=7,train.progress_bar=0"
    )
    assert config.model.final_drop_rate == 0.3 and config.model.drop_mode == "row"
    assert config.train.num_train_steps == 7 and config.train.progress_bar is False
    with pytest.raises(ValueError, match="unknown config argument 'final_rate'"):
        config_utils.apply_arg(config, "final_rate=0.3")
    oc = config_utils.default_config().optim
    lr = optim.learning_rate_schedule(oc, total_steps=100, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001]
    )
    oc.warmup_steps, oc.warmup_type, oc.warmup_factor = 4, "constant", 0.1
    lr = optim.learning_rate_schedule(oc, total_steps=100, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 3, 4)] == pytest.approx([0.01, 0.01, 0.1])


def test_eight_devices_match_one_device():
    """A few train steps on a global batch sharded over 8 CPU devices vs 1 device."""
    script = textwrap.dedent(
        f"""
        import functools, sys
        sys.path.insert(0, {REPO!r})
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from sdjax import data as data_lib, optim, train
        sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        from test_train import tiny_config
        config = tiny_config()
        config.model.drop_mode = "row"
        ds = data_lib.create(config.input)
        tx = optim.create(config.optim, 6, ds.steps_per_epoch(32))
        model = train.create_model(config)
        key = jax.random.key(0)
        def run(devices):
            mesh = Mesh(np.asarray(devices), ("data",))
            rep, sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            init = functools.partial(train.create_train_state, config, model, (8, 8, 1), tx=tx)
            state = jax.jit(init, out_shardings=rep)(key)
            step = jax.jit(functools.partial(train.train_step, augment_kwargs=ds.augment_kwargs(),
                           num_classes=10), in_shardings=(rep, sh, rep), out_shardings=(rep, rep))
            losses = []
            for s in range(4):
                batch = {{k: jax.device_put(v, sh) for k, v in ds.train_batch(0, s, 32).items()}}
                state, m = step(state, batch, key)
                losses.append(float(m["loss"]))
            return np.array(losses)
        assert jax.device_count() == 8
        one, eight = run(jax.devices()[:1]), run(jax.devices())
        print(one, eight)
        np.testing.assert_allclose(one, eight, rtol=2e-4, atol=2e-5)
        """
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
