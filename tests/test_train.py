"""Tests of the trainer (sdjax.trainer, sdjax.loop, sdjax.steps) in-process on the tiny config.

One reference run (module fixture) is copied by the tests that resume, rerun or reject a
workdir; every resume test proves that it resumed (the metrics log shows where it started and
no step run twice beyond the last checkpoint).
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from workdir_digest import tree_digest

from sdjax import data as data_lib
from sdjax import loop, models, steps, trainer

REFERENCE_STEPS = 8


def restore_state(workdir, step):
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",))
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
    finally:
        manager.close()


def assert_bitwise_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b and flat_a
    for x, y in zip(flat_a, flat_b, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def train_records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train_loss" in r]


def reference_config(make):
    config = make(f"steps={REFERENCE_STEPS},validation_size=100")
    config.train.log_every_steps = 1
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 8 steps (validation split, checkpoints at 3, 6 and 8)."""
    from tiny_config import get_config  # noqa: PLC0415

    workdir = tmp_path_factory.mktemp("reference") / "run"
    loop.train_and_evaluate(reference_config(get_config), str(workdir))
    return workdir


@pytest.fixture
def copy_of_reference(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "copy")
    return tmp_path / "copy"


def test_end_to_end_builds_once_and_writes_results_metrics_and_checkpoints(
    tmp_path, tiny_config, monkeypatch
):
    calls = {"data": 0, "model": 0}
    create_data, create_model = data_lib.create, models.create

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(data_lib, "create", count("data", create_data))
    monkeypatch.setattr(models, "create", count("model", create_model))
    workdir = tmp_path / "run"
    config = tiny_config()
    config.train.tensorboard = True
    results = loop.train_and_evaluate(config, str(workdir))
    assert calls == {"data": 1, "model": 1}  # built once, checked on the same objects
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["steps"] == results["steps"] == 6
    assert on_disk["test_error"] == pytest.approx(1 - on_disk["test_accuracy"])
    assert on_disk["config"]["model"]["name"] == "cifar_resnet20"
    assert "jax" in on_disk["versions"] and on_disk["devices"]["device_count"] >= 1
    assert np.isfinite(on_disk["final_train_loss"])
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "learning_rate", "examples_per_s"} <= set(lines[0])
    # Batch-mode stochastic depth: each logged window's blocks are the mean of the gates that
    # the steps' dropout keys draw.
    config = tiny_config()
    model = trainer.create_model(config)
    train_key = jax.random.fold_in(jax.random.key(config.seed, impl=config.prng_impl), 1)
    logged = [x for x in lines if "train_loss" in x]
    assert [x["step"] for x in logged] == [2, 3, 4, 6]  # every 2 steps, and at the save at 3
    first = 0
    for x in logged:
        keys = [
            jax.random.fold_in(jax.random.fold_in(train_key, s), 0) for s in range(first, x["step"])
        ]
        runs = [int(models.batch_gates(model, k).sum()) for k in keys]
        assert x["train_blocks_run"] == pytest.approx(np.mean(runs)), x
        first = x["step"]
    assert min(x["train_blocks_run"] for x in logged) < model.num_blocks == 9
    assert any("test_accuracy" in x for x in lines)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert os.listdir(workdir / "tensorboard")


def test_preempted_twice_then_resumed_equals_the_uninterrupted_run(
    reference, tmp_path, tiny_config, monkeypatch
):
    """Preempted at step 3 and at the last step (8): the reruns resume, never restart, and end
    with the reference's state, per-step metrics and results, final train loss included."""
    config = reference_config(tiny_config)
    workdir = tmp_path / "resumed"
    for stop in (3, REFERENCE_STEPS):
        monkeypatch.setattr(loop.Preemption, "reached", lambda self, step, s=stop: step == s)
        out = loop.train_and_evaluate(config, str(workdir))
        assert out == {"preempted": True, "steps": stop, "saved": True}
        assert not (workdir / "results.json").exists()
    monkeypatch.undo()
    again = loop.train_and_evaluate(config, str(workdir))

    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, REFERENCE_STEPS + 1))  # no step twice
    strip = lambda rs: [{k: v for k, v in r.items() if k not in loop.TIMING_METRICS} for r in rs]  # noqa: E731
    assert strip(records) == strip(train_records(reference))
    assert_bitwise_equal(restore_state(reference, 8), restore_state(workdir, 8))
    expected = json.loads((reference / "results.json").read_text())
    for key in set(expected) - set(loop.INVOCATION_RESULTS):
        assert again[key] == expected[key], key
    assert np.isfinite(again["final_train_loss"])


def test_rerun_of_a_finished_run_leaves_its_files_unchanged(copy_of_reference, tiny_config):
    before = tree_digest(copy_of_reference)
    expected = json.loads((copy_of_reference / "results.json").read_text())
    config = reference_config(tiny_config)
    config.train.log_every_steps = 4  # a harmless change is accepted
    assert loop.train_and_evaluate(config, str(copy_of_reference)) == expected
    assert tree_digest(copy_of_reference) == before


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(
    copy_of_reference, tiny_config, no_compile
):
    before = tree_digest(copy_of_reference)
    config = reference_config(tiny_config)
    config.train.num_train_steps = 5
    with pytest.raises(ValueError, match="at step 8, beyond this run's 5 steps"):
        loop.train_and_evaluate(config, str(copy_of_reference))
    assert tree_digest(copy_of_reference) == before


def test_resume_with_a_trajectory_changing_config_is_refused_unless_allowed(
    copy_of_reference, tiny_config, monkeypatch
):
    before = tree_digest(copy_of_reference)
    config = reference_config(tiny_config)
    config.seed = 1
    config.optim.learning_rate = 0.05
    config.train.num_train_steps = 10
    with monkeypatch.context() as m:
        m.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the check"))
        with pytest.raises(ValueError) as error:
            loop.train_and_evaluate(config, str(copy_of_reference))
    message = str(error.value)
    for part in ("seed: 0 -> 1", "optim.learning_rate: 0.1 -> 0.05", "train.num_train_steps"):
        assert part in message
    assert "allow_config_change" in message
    assert tree_digest(copy_of_reference) == before

    config = reference_config(tiny_config)
    config.train.num_train_steps = 10
    config.train.allow_config_change = True
    results = loop.train_and_evaluate(config, str(copy_of_reference))
    assert results["steps"] == 10
    assert [r["step"] for r in train_records(copy_of_reference)] == list(range(1, 11))


def test_checkpoint_of_another_model_is_refused_before_compiling(
    copy_of_reference, tiny_config, no_compile
):
    before = tree_digest(copy_of_reference)
    other = reference_config(tiny_config)
    other.model.name = "cifar_resnet32"
    with pytest.raises(ValueError, match="cifar_resnet20.*cifar_resnet32.*nothing was loaded"):
        loop.train_and_evaluate(other, str(copy_of_reference))
    wider = reference_config(tiny_config)
    wider.model.widths = (4, 8, 8)
    with pytest.raises(ValueError, match="different parameter shapes.*nothing was loaded"):
        loop.train_and_evaluate(wider, str(copy_of_reference))
    assert tree_digest(copy_of_reference) == before


def _poison(monkeypatch, at_step: int, what: str):
    """Makes train step ``at_step`` (0-based) produce a NaN loss or, with a finite loss, a NaN
    update of the parameters."""
    if what == "loss":
        original = steps.train_step

        def train_step(state, batch, rng, **kwargs):
            bad = state.step == at_step
            batch = dict(batch, image=jax.numpy.where(bad, np.nan, batch["image"]))
            return original(state, batch, rng, **kwargs)

        monkeypatch.setattr(steps, "train_step", train_step)
    else:
        apply_gradients = steps.TrainState.apply_gradients

        def nan_update(self, *, grads, **kwargs):
            new = apply_gradients(self, grads=grads, **kwargs)
            scale = jax.numpy.where(self.step == at_step, np.nan, 1.0)
            return new.replace(params=jax.tree.map(lambda p: p * scale, new.params))

        monkeypatch.setattr(steps.TrainState, "apply_gradients", nan_update)


@pytest.mark.parametrize("what", ["loss", "params"])
def test_non_finite_loss_or_state_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_config, monkeypatch, what
):
    """Step 5 (0-based) is poisoned: a NaN loss, or a finite loss with a NaN update. The run
    stops when checkpoint 6 is about to be saved; checkpoint 3 is the last, finite one."""
    _poison(monkeypatch, 5, what)
    config = tiny_config()
    config.train.log_every_steps = 4
    workdir = tmp_path / "nan"
    with pytest.raises(FloatingPointError) as error:
        loop.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert "step 6" in message and "last good checkpoint (step 3)" in message
    assert str(workdir / "checkpoints") in message
    assert not (workdir / "results.json").exists()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    state = restore_state(workdir, 3)
    leaves = jax.tree.leaves((state["params"], state["batch_stats"], state["opt_state"]))
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_drop_warmup_ramps_the_drop_rates_from_zero_and_resumes_exactly(
    tmp_path, tiny_config, monkeypatch
):
    """``train.drop_warmup_fraction=0.5`` of 6 steps: step s (0-based) trains with the rates
    scaled by min(1, s / 3) = 0, 1/3, 2/3, 1, 1, 1; the gates each step drew are those of
    ``batch_gates`` at that scale, and a run preempted at step 2 (mid-ramp) resumes to the same
    state."""
    config = tiny_config()
    config.train.drop_warmup_fraction = 0.5
    config.train.log_every_steps = 1
    workdir = tmp_path / "warmup"
    loop.train_and_evaluate(config, str(workdir))
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(loop.Preemption, "reached", lambda self, step: step == 2)
        assert loop.train_and_evaluate(config, str(resumed))["steps"] == 2
    loop.train_and_evaluate(config, str(resumed))
    assert [r["step"] for r in train_records(resumed)] == list(range(1, 7))
    assert_bitwise_equal(restore_state(workdir, 6), restore_state(resumed, 6))
    model = trainer.create_model(config)
    train_key = jax.random.fold_in(jax.random.key(config.seed, impl=config.prng_impl), 1)
    blocks = [r["train_blocks_run"] for r in train_records(workdir)]
    scales = [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]  # by hand, not from steps.drop_rate_scale
    expected, at_full_rate = [], []
    for s, scale in enumerate(scales):
        key = jax.random.fold_in(jax.random.fold_in(train_key, s), 0)
        expected.append(int(models.batch_gates(model, key, drop_rate_scale=scale).sum()))
        at_full_rate.append(int(models.batch_gates(model, key).sum()))
    assert blocks == expected
    # These keys tell the ramp from a jump to the full rates after step 0: steps 1 and 2 run all
    # 9 blocks with the ramp, fewer at the full rates.
    assert blocks[:3] == [9, 9, 9] and at_full_rate[1:3] == [6, 8]
    for s, scale in enumerate(scales):
        assert float(steps.drop_rate_scale(s, 3.0)) == pytest.approx(scale, rel=1e-6), s


def test_row_subset_draws_one_subset_per_device_unless_the_config_says_otherwise(
    tiny_config, monkeypatch
):
    """Four devices (``jax.device_count`` patched: the default must follow it, and one device
    would make it equal to 1): ``drop_shards`` defaults to 4; a configured value wins."""
    monkeypatch.setattr(jax, "device_count", lambda *a, **k: 4)
    config = tiny_config("model.drop_mode=row_subset")
    assert trainer.model_kwargs(config)["drop_shards"] == 4
    assert trainer.create_model(config).drop_shards == 4
    config.model.drop_shards = 1
    assert trainer.model_kwargs(config)["drop_shards"] == 1
    assert trainer.create_model(config).drop_shards == 1
    config.model.drop_mode = "row"
    del config.model["drop_shards"]
    assert "drop_shards" not in trainer.model_kwargs(config)
