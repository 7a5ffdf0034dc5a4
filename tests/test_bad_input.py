"""Every bad input is a clear error before anything compiles, and nothing already written is lost.

Each case goes through ``sdjax.loop.train_and_evaluate`` (the command line's messages are
tested in ``test_main.py``). "Before compiling" is enforced, not hoped for: ``jax.jit`` is
replaced by a function that fails the test, so an error found only after the train state or the
train step is compiled fails here. "Nothing lost" is checked on a workdir that already holds
results, metrics and a checkpoint of an earlier run: every file's bytes are compared before and
after; a fresh workdir must not even be created.
"""

from __future__ import annotations

import pathlib

import jax
import pytest
from workdir_digest import tree_digest

from sdjax import config as config_lib
from sdjax import loop


def set_field(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


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
            loop.train_and_evaluate(config, str(workdir))
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
        ("model.widht", 3, ["config.model", "widht", "widths"]),
        ("input.dataset", "mnist", ["input.dataset", "'mnist'", "digits", "cifar10", "synthetic"]),
        ("model.drop_schedule", "linaer", ["drop_schedule", "'linaer'", "linear", "uniform"]),
        ("model.drop_mode", "rows", ["drop_mode", "'rows'", "row", "batch"]),
        ("model.num_classes", 7, ["config.model.num_classes=7", "10"]),
        ("optim.lr_schedule", "cosin", ["lr_schedule", "'cosin'", "cosine", "step"]),
        ("optim.learning_rate", -0.1, ["config.optim.learning_rate=-0.1", "a number >="]),
        ("optim.learning_rate", 1e39, ["config.optim.learning_rate=1e+39", "<= 3.4"]),
        ("optim.learning_rate", 1e-45, ["config.optim.learning_rate=1e-45", ">= 1.17"]),
        ("prng_impl", "philox", ["prng_impl", "'philox'", "threefry2x32", "rbg"]),
        ("input.validation_size", 1437, ["input.validation_size=1437", "at most 1405"]),
        ("train.num_cpu_devices", -1, ["train.num_cpu_devices", "-1", "integer >= 0"]),
        ("train.host_malloc", "fast", ["train.host_malloc", "'fast'", "auto", "reuse", "system"]),
        ("train.drop_warmup_fraction", 1.0, ["train.drop_warmup_fraction=1.0", "< 1"]),
    ],
)
def test_bad_values(field, value, patterns, tmp_path, previous_run, no_compile, tiny_config):
    config = tiny_config()
    set_field(config, field, value)
    assert_rejected(config, tmp_path, previous_run, *patterns)


def test_images_of_the_wrong_shape(tmp_path, previous_run, no_compile, tiny_config):
    config = tiny_config()
    config.model.input_channels = 3  # digits are 8x8x1
    assert_rejected(config, tmp_path, previous_run, "(8, 8, 1)", "cifar_resnet20", "channels")

    config = tiny_config()
    config.input.dataset = "synthetic"
    config.input.synthetic_image_shape = (2, 2, 1)  # smaller than the network's 4x4 minimum
    config.model.input_channels = 1
    assert_rejected(config, tmp_path, previous_run, "(2, 2, 1)", "synthetic", "cifar_resnet20")


def test_missing_dataset_via_tfds_data_dir_env(
    tmp_path, previous_run, no_compile, monkeypatch, tiny_config
):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    config = tiny_config()
    config.input.dataset = "cifar10"
    config.model.input_channels = 3
    assert_rejected(config, tmp_path, previous_run, "'cifar10'", str(empty), "$TFDS_DATA_DIR")


def test_batch_size_not_divisible_by_the_devices(
    tmp_path, previous_run, no_compile, monkeypatch, tiny_config
):
    monkeypatch.setattr(jax, "device_count", lambda *a: 8)
    for field, value in (("batch_size", 36), ("eval_batch_size", 100)):
        config = tiny_config()
        config.train[field] = value
        assert_rejected(
            config, tmp_path, previous_run, f"train.{field}={value}", "multiple of", "(8)"
        )


def test_unwritable_workdir(tmp_path, no_compile, tiny_config):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(ValueError, match="workdir .*a_file/run.* is not writable.*--workdir"):
        loop.train_and_evaluate(tiny_config(), str(blocker / "run"))
    assert blocker.read_text() == "keep me"


def test_read_only_workdir(tmp_path, no_compile, monkeypatch, tiny_config):
    """A workdir the process may not write to (injected: root may write anywhere)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_lib.tempfile, "NamedTemporaryFile", refuse)
    workdir = tmp_path / "ro"
    workdir.mkdir()
    with pytest.raises(ValueError, match="ro' is not writable \\(Permission denied\\)"):
        loop.train_and_evaluate(tiny_config(), str(workdir))
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_num_cpu_devices_after_jax_started_with_other_devices(
    tmp_path, previous_run, no_compile, tiny_config
):
    config = tiny_config()
    config.train.num_cpu_devices = len(jax.devices("cpu")) + 1  # JAX is running in this process
    assert_rejected(
        config, tmp_path, previous_run, "train.num_cpu_devices", "sdjax.runtime.setup", "fresh"
    )


def test_the_no_compile_guard_catches_a_late_check(tmp_path, no_compile, tiny_config):
    """A valid config passes every check and reaches ``jax.jit``: the guard is not vacuous."""
    with pytest.raises(AssertionError, match="jax.jit was called"):
        loop.train_and_evaluate(tiny_config(), str(tmp_path / "ok"))
