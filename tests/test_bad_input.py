"""Every bad input is a clear error before anything compiles, and nothing already written is lost.

Each case goes through the real entry points (``sdjax.train.train_and_evaluate`` or
``python -m sdjax.main``). "Before compiling" is enforced, not hoped for: ``jax.jit`` is replaced
by a function that fails the test, so an error found only after the train state or the train
step is compiled fails here. "Nothing lost" is checked on a workdir that already holds results,
metrics and a checkpoint from an earlier run: every file's bytes are compared before and after;
a fresh workdir must not even be created. A NaN loss in the middle of a run (which can only be
found by running) stops the run with a clear error and keeps the last good checkpoint, which
loads.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sdjax import checkpoint as checkpoint_lib
from sdjax import optim, train
from sdjax.data import pipeline

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
    """The digits default with a narrow ResNet-20 (valid: each test breaks one field)."""
    sys.path.insert(0, str(REPO_ROOT))
    from configs import digits_sd  # noqa: PLC0415

    config = digits_sd.get_config()
    config.model.name = "cifar_resnet20"
    config.model.widths = (4, 4, 8)
    config.model.scan_blocks = False
    config.train.batch_size = 32
    config.train.num_train_steps = 8
    config.train.checkpoint_every_steps = 2
    config.train.log_every_steps = 4
    config.train.progress_bar = False
    return config


def set_field(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def tree_digest(path: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_compile(monkeypatch):
    """Makes any ``jax.jit`` call (the train state, train or eval step) fail the test."""

    def jit(*args, **kwargs):
        raise AssertionError("jax.jit was called before the bad input was reported")

    monkeypatch.setattr(jax, "jit", jit)


@pytest.fixture
def previous_run(tmp_path) -> pathlib.Path:
    """A workdir with what an earlier run wrote (results, metrics, config, a checkpoint)."""
    workdir = tmp_path / "previous"
    (workdir / "checkpoints" / "4" / "state").mkdir(parents=True)
    (workdir / "checkpoints" / "4" / "state" / "data").write_bytes(b"\x00\x01weights")
    (workdir / "results.json").write_text('{"test_accuracy": 0.97}')
    (workdir / "metrics.jsonl").write_text('{"step": 4, "train_loss": 0.1}\n')
    (workdir / "config.json").write_text("{}")
    return workdir


def assert_rejected(config, tmp_path, previous_run, *patterns: str) -> str:
    """Runs ``train_and_evaluate`` on a fresh and on an existing workdir; both must fail with a
    ValueError whose message contains every pattern, leaving the fresh one uncreated and the
    existing one byte-for-byte unchanged."""
    fresh = tmp_path / "fresh"
    before = tree_digest(previous_run)
    for workdir in (fresh, previous_run):
        with pytest.raises(ValueError) as error:
            train.train_and_evaluate(config, str(workdir))
        message = str(error.value)
        for pattern in patterns:
            assert pattern in message, f"{pattern!r} not in {message!r}"
    assert not fresh.exists()
    assert tree_digest(previous_run) == before
    return message


@pytest.mark.parametrize(
    "field, value, patterns",
    [
        ("model.final_drop_rate", 1.5, ["config.model.final_drop_rate", "[0, 1]", "1.5"]),
        ("model.final_drop_rate", -0.1, ["config.model.final_drop_rate", "[0, 1]", "-0.1"]),
        ("model.final_drop_rate", float("nan"), ["config.model.final_drop_rate", "[0, 1]", "nan"]),
        ("model.name", "resnet9000", ["model.name", "'resnet9000'", "cifar_resnet20", "resnet50"]),
        ("input.dataset", "mnist", ["input.dataset", "'mnist'", "digits", "cifar10", "synthetic"]),
        ("model.drop_schedule", "linaer", ["drop_schedule", "'linaer'", "linear", "uniform"]),
        ("model.drop_mode", "rows", ["drop_mode", "'rows'", "'row'", "'batch'"]),
        ("optim.lr_schedule", "cosin", ["lr_schedule", "'cosin'", "cosine", "step"]),
        ("prng_impl", "philox", ["prng_impl", "'philox'", "threefry2x32", "rbg"]),
        ("train.num_cpu_devices", -1, ["train.num_cpu_devices", "-1", "integer >= 0"]),
        ("train.host_malloc", "fast", ["train.host_malloc", "'fast'", "auto", "reuse", "system"]),
    ],
)
def test_bad_names_and_rates(field, value, patterns, tmp_path, previous_run, no_compile):
    config = tiny_config()
    set_field(config, field, value)
    assert_rejected(config, tmp_path, previous_run, *patterns)


def test_images_of_the_wrong_shape(tmp_path, previous_run, no_compile):
    config = tiny_config()
    config.model.input_channels = 3  # digits are 8x8x1
    assert_rejected(config, tmp_path, previous_run, "(8, 8, 1)", "cifar_resnet20", "channels")

    config = tiny_config()
    config.input.dataset = "synthetic"
    config.input.synthetic_image_shape = (2, 2, 1)  # smaller than the network's 4x4 minimum
    config.model.input_channels = 1
    assert_rejected(config, tmp_path, previous_run, "(2, 2, 1)", "synthetic", "cifar_resnet20")


def test_missing_dataset_in_a_tfds_dir_says_where_it_looked_and_how_to_fix(
    tmp_path, previous_run, no_compile, tfds_data_dir
):
    # The shared tfds folder holds cifar10 only.
    config = tiny_config()
    config.input.dataset = "cifar100"
    config.model.num_classes = 100
    config.model.input_channels = 3
    config.input.data_dir = str(tfds_data_dir)
    message = assert_rejected(
        config, tmp_path, previous_run, "'cifar100'", str(tfds_data_dir), "tfds build"
    )
    assert "TFDS_DATA_DIR" in message and "data_dir" in message


def test_missing_dataset_via_tfds_data_dir_env(tmp_path, previous_run, no_compile, monkeypatch):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    config = tiny_config()
    config.input.dataset = "cifar10"
    config.model.input_channels = 3
    assert_rejected(config, tmp_path, previous_run, "'cifar10'", str(empty), "$TFDS_DATA_DIR")


def test_unwritable_workdir(tmp_path, no_compile):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(ValueError, match="workdir .*a_file/run.* is not writable.*--workdir"):
        train.train_and_evaluate(tiny_config(), str(blocker / "run"))
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_workdir(tmp_path, no_compile):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            train.train_and_evaluate(tiny_config(), str(workdir))
    finally:
        workdir.chmod(0o700)


def _child(script: str, *args: str, devices: int = 1, timeout: int = 300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *([] if script is None else ["-c", script]), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


DIVISIBILITY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax
    sys.path.insert(0, "tests")
    from test_bad_input import tiny_config
    from sdjax import train

    def jit(*args, **kwargs):
        raise AssertionError("jax.jit was called before the bad input was reported")

    jax.jit = jit
    assert jax.device_count() == 8
    workdir = sys.argv[1]
    for field, value in (("batch_size", 36), ("eval_batch_size", 100)):
        config = tiny_config()
        config.train[field] = value
        try:
            train.train_and_evaluate(config, workdir)
        except ValueError as e:
            print("ERROR", e)
        else:
            raise SystemExit("no error")
    assert not os.path.exists(workdir)
    """
)


@pytest.mark.slow
def test_num_cpu_devices_after_jax_started_with_other_devices(tmp_path, previous_run, no_compile):
    config = tiny_config()
    config.train.num_cpu_devices = len(jax.devices("cpu")) + 1  # JAX is running in this process
    assert_rejected(
        config, tmp_path, previous_run, "train.num_cpu_devices", "already initialized", "fresh"
    )


def test_batch_size_not_divisible_by_the_devices(tmp_path):
    proc = _child(DIVISIBILITY_SCRIPT, str(tmp_path / "w"), devices=8)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    errors = [x for x in proc.stdout.splitlines() if x.startswith("ERROR")]
    assert len(errors) == 2, proc.stdout
    assert (
        "train.batch_size=36" in errors[0] and "multiple of the number of devices (8)" in errors[0]
    )
    assert "train.eval_batch_size=100" in errors[1] and "(8)" in errors[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, patterns",
    [
        (["--config.model.final_drop_rat=0.3"], ["final_drop_rat", "final_drop_rate"]),
        (["--config.modle.name=cifar_resnet20"], ["modle", "model"]),
        (["--config.train.batch_size=many"], ["batch_size", "many"]),
    ],
    ids=["field", "section", "type"],
)
def test_cli_override_typo_is_a_clear_error_and_workdir_untouched(args, patterns, previous_run):
    before = tree_digest(previous_run)
    proc = _child(
        None,
        "-m",
        "sdjax.main",
        "--config=configs/digits_sd.py",
        f"--workdir={previous_run}",
        *args,
    )
    assert proc.returncode != 0
    for pattern in patterns:
        assert pattern in proc.stderr, proc.stderr[-3000:]
    assert not uncaught_exception(proc.stderr), "a crash is not a clear error:\n" + proc.stderr
    assert tree_digest(previous_run) == before


@pytest.mark.slow
def test_cli_arg_string_typo_lists_valid_keys(previous_run):
    before = tree_digest(previous_run)
    proc = _child(
        None, "-m", "sdjax.main", "--config=configs/digits_sd.py:final_rate=0.3",
        f"--workdir={previous_run}",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "unknown config argument 'final_rate'" in proc.stderr
    assert "final_drop_rate" in proc.stderr  # among the valid keys
    assert not uncaught_exception(proc.stderr), proc.stderr
    assert tree_digest(previous_run) == before


def uncaught_exception(stderr: str) -> bool:
    """True if the process died of an uncaught exception (a flag error quoting one is fine)."""
    return any(line.startswith("Traceback (most recent call last)") for line in stderr.splitlines())


NAN_STEP = 5  # 0-based index of the step whose batch is poisoned


@pytest.mark.slow
def test_nan_loss_mid_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = pipeline.InMemoryData.train_batch

    def poisoned(self, seed, step, *args, **kwargs):
        batch = original(self, seed, step, *args, **kwargs)
        if step == NAN_STEP:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    monkeypatch.setattr(pipeline.InMemoryData, "train_batch", poisoned)
    config = tiny_config()  # checkpoints every 2 steps, loss checked every 4 steps
    workdir = tmp_path / "nan"
    with pytest.raises(FloatingPointError) as error:
        train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    # Steps count from 1 in messages and checkpoints: the poisoned step is step 6, detected when
    # checkpoint 6 is about to be saved; checkpoint 4 is the last good one.
    assert "nan" in message and f"step {NAN_STEP + 1}" in message
    assert "last good checkpoint (step 4)" in message and str(workdir / "checkpoints") in message
    assert not (workdir / "results.json").exists()

    checkpointer = checkpoint_lib.Checkpointer(
        str(workdir / "checkpoints"), 3, train._json_model_config(config)
    )
    try:
        assert checkpointer.latest_step() == 4
        assert sorted(checkpointer.manager.all_steps()) == [2, 4]
        model = train.create_model(config)
        tx = optim.create(config.optim, 8, 44)
        init = functools.partial(train.create_train_state, config, model, (8, 8, 1), tx=tx)
        target = jax.eval_shape(init, jax.random.key(0))
        state, meta = checkpointer.restore(target)
    finally:
        checkpointer.close()
    assert int(state.step) == 4
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_the_no_compile_guard_catches_a_late_check(tmp_path, no_compile):
    """A valid config passes validation and reaches ``jax.jit``: the guard above is not vacuous."""
    with pytest.raises(AssertionError, match="jax.jit was called"):
        train.train_and_evaluate(tiny_config(), str(tmp_path / "ok"))
