"""The ``.npz`` data source and export, and a run on it that imports no TensorFlow, tfds or clu
(the full-scale experiment's host: JAX, Flax, optax, chex and orbax, no TensorFlow)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax.data import npz, npz_export, sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def _arrays(num_train=200, num_test=100, shape=(8, 8, 3), seed=0):
    rng = np.random.default_rng(seed)
    train = (rng.integers(0, 256, (num_train, *shape), np.uint8), rng.integers(0, 10, num_train))
    test = (rng.integers(0, 256, (num_test, *shape), np.uint8), rng.integers(0, 10, num_test))
    return train, test


def _input(path, **overrides):
    config = config_lib.default_config().input
    config.dataset, config.npz_path = "cifar10", str(path)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_npz_round_trip_reads_shapes_from_the_headers(tmp_path):
    train, test = _arrays()
    path = tmp_path / "c10.npz"
    npz.write(str(path), train, test, dataset="cifar10", num_classes=10)
    assert npz.read_shapes(str(path))["train_images"] == (200, 8, 8, 3)
    info = sources.check_available(_input(path))
    assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
        10,
        (8, 8, 3),
        200,
        100,
    )
    ds = data_lib.create(_input(path, validation_size=50))
    assert len(ds.train[1]) == 150 and len(ds.val[1]) == 50 and ds.train[1].dtype == np.int32
    (x_tr, y_tr), (x_te, y_te) = npz.load_arrays(str(path))
    np.testing.assert_array_equal(x_tr, train[0])
    np.testing.assert_array_equal(y_tr, train[1])
    np.testing.assert_array_equal(x_te, test[0])
    np.testing.assert_array_equal(y_te, test[1])
    assert x_tr.dtype == np.uint8


def test_npz_mismatches_are_named(tmp_path):
    train, test = _arrays()
    path = tmp_path / "c10.npz"
    npz.write(str(path), train, test, dataset="cifar10", num_classes=10)
    with pytest.raises(ValueError, match="is not a file; write it with"):
        sources.check_available(_input(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="holds 'cifar10', not config.input.dataset='cifar100'"):
        sources.check_available(_input(path, dataset="cifar100"))
    with pytest.raises(ValueError, match=r"config.input.train_split='train\[:10\]' is invalid"):
        sources.check_available(_input(path, train_split="train[:10]"))
    with pytest.raises(ValueError, match="does not match"):
        sources.check_available(_input(path, dataset="cifar10", use_extra=True))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a readable .npz"):
        sources.check_available(_input(tmp_path / "bad.npz"))


def test_export_writes_the_tfds_arrays(tfds_data_dir, tmp_path):
    out = tmp_path / "c10.npz"
    summary = npz_export.export(
        "cifar10", str(out), data_dir=str(tfds_data_dir), train_size=64, test_size=32
    )
    assert summary["train_images"] == (64, 32, 32, 3) and summary["bytes"] == out.stat().st_size
    config = config_lib.default_config().input
    config.data_dir, config.train_split, config.test_split = (
        str(tfds_data_dir),
        "train[:64]",
        "test[:32]",
    )
    (x_tr, y_tr), (x_te, y_te) = sources.load_arrays(config)
    (a_tr, b_tr), (a_te, b_te) = npz.load_arrays(str(out))
    np.testing.assert_array_equal(a_tr, x_tr)
    np.testing.assert_array_equal(b_tr, y_tr)
    np.testing.assert_array_equal(a_te, x_te)
    np.testing.assert_array_equal(b_te, y_te)
    with pytest.raises(ValueError, match="--dataset='digits' is invalid"):
        npz_export.export("digits", str(out))


# A child process that runs `python -m sdjax.main` on an npz and prints what was imported; with
# "hide", tensorflow, tensorflow_datasets and clu cannot be imported (the full-scale host), else
# they are installed but must not be imported.
_CHILD = """
import importlib.abc, json, runpy, sys

class Hide(importlib.abc.MetaPathFinder):
    # The original finders, except that these packages are not found (as if not installed:
    # importlib.util.find_spec returns None, an import raises ModuleNotFoundError).
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()

if sys.argv[1] == "hide":
    sys.meta_path[:] = [Hide(list(sys.meta_path))]
sys.argv = ["sdjax.main", *sys.argv[2:]]
try:
    runpy.run_module("sdjax.main", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
top = sorted({m.split(".")[0] for m in sys.modules})
print("MODULES " + json.dumps(top))
"""


@pytest.mark.parametrize("hide", ["hide", "installed"])
def test_a_run_on_npz_imports_no_tensorflow_tfds_or_clu(tmp_path, hide):
    train, test = _arrays(num_train=200, num_test=100)
    path = tmp_path / "c10.npz"
    npz.write(str(path), train, test, dataset="cifar10", num_classes=10)
    workdir = tmp_path / "run"
    arg = (
        "model=cifar_resnet20,model.widths=4;4;8,validation_size=40,batch_size=64,epochs=2,"
        f"npz_path={path}"
    )
    command = [
        sys.executable,
        "-c",
        _CHILD,
        hide,
        f"--config={REPO / 'configs' / 'cifar10_sd.py'}:{arg}",
        f"--workdir={workdir}",
        "--config.train.eval_batch_size=100",
        "--config.train.progress_bar=False",
        "--config.train.tensorboard=False",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.split("MODULES ", 1)[1])
    assert not {"tensorflow", "tensorflow_datasets", "clu", "keras"} & set(modules)
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 6 and results["best_val_epoch"] in (1, 2)  # 160 = 64 + 64 + 32
    assert results["config"]["input"]["npz_path"] == str(path)
    assert (workdir / "metrics.jsonl").exists() and not (workdir / "tensorboard").exists()


def test_fullscale_plan_pairs_seeds_and_reports_a_paired_interval(tmp_path):
    from experiments.fullscale import run

    runs = run.plan("c10.npz", [3, 4], 500, tmp_path)
    assert [(r["arm"], r["seed"]) for r in runs] == [
        ("constant", 3),
        ("sd", 3),
        ("constant", 4),
        ("sd", 4),
    ]
    flags = runs[1]["command"]
    assert "--config=configs/cifar10_sd.py:seed=3,epochs=500" in flags
    assert f"--config.input.npz_path={os.path.abspath('c10.npz')}" in flags
    assert "--config.train.tensorboard=False" in flags
    results = {
        ("constant", 3): {"test_error_at_best_val": 0.065, "test_error": 0.066},
        ("sd", 3): {"test_error_at_best_val": 0.055, "test_error": 0.054},
        ("constant", 4): {"test_error_at_best_val": 0.064, "test_error": 0.063},
        ("sd", 4): {"test_error_at_best_val": 0.050, "test_error": 0.052},
        ("constant", 5): {"test_error_at_best_val": 0.06, "test_error": 0.06},  # no pair yet
    }
    summary = run.paired_summary(results)
    assert [p["seed"] for p in summary["pairs"]] == [3, 4]
    ci = summary["test_error_at_best_val"]
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(-0.012)
    # Paired: the t interval of the two differences (-0.010, -0.014), 1 df.
    assert ci["half_width"] == pytest.approx(12.706 * 0.002 * 2**0.5 / 2**0.5, rel=1e-3)
    text = run.results_markdown(summary)
    assert "| 3 | 6.50 | 5.50 | -1.00 |" in text and "paired by seed" in text


def test_fullscale_command_joins_a_file_carried_in_parts(tmp_path):
    data = bytes(range(256)) * 1000
    for k, start in enumerate(range(0, len(data), 100_000)):
        (tmp_path / f"c10.npz.part-a{'abc'[k]}").write_bytes(data[start : start + 100_000])
    command = ["bash", str(REPO / "experiments/fullscale/run.sh"), str(tmp_path / "c10.npz")]
    proc = subprocess.run(
        [*command, "--dry_run", f"--out={tmp_path / 'out'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "joined 3 parts" in proc.stderr
    assert (tmp_path / "c10.npz").read_bytes() == data
    assert f"--config.input.npz_path={tmp_path / 'c10.npz'}" in proc.stdout


def test_a_pre_split_file_gives_a_run_the_same_data_as_the_whole_split(tmp_path):
    train, test = _arrays(num_train=300)
    whole, part = tmp_path / "whole.npz", tmp_path / "part.npz"
    npz.write(str(whole), train, test, dataset="cifar10", num_classes=10)
    split = (50, 3, 120)
    subset = npz_export.split_arrays(train, split)
    npz.write(str(part), subset, test, dataset="cifar10", num_classes=10, split=split)
    assert npz.file_split(str(part)) == split and npz.file_split(str(whole)) is None
    assert npz.read_shapes(str(part))["train_images"] == (170, 8, 8, 3)
    fields = {
        "validation_size": 50,
        "split_seed": 3,
        "train_size": 120,
        "normalization": "pixel_mean_global_std",
    }
    a, b = (data_lib.create(_input(path, **fields)) for path in (whole, part))
    for name in ("train", "val", "test"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            np.testing.assert_array_equal(x, y)
    assert len(b.train[1]) == 120 and len(b.val[1]) == 50
    np.testing.assert_array_equal(a.mean, b.mean)
    assert a.std == b.std
    for step in (0, 3, 7):  # the same batches, epoch after epoch
        x, y = a.train_batch(5, step, 32), b.train_batch(5, step, 32)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    for field, value in (("split_seed", 0), ("validation_size", 40), ("train_size", 0)):
        with pytest.raises(ValueError, match=f"config.input.{field}={value} does not match") as e:
            sources.check_available(_input(part, **{**fields, field: value}))
        assert "validation_size=50, split_seed=3, train_size=120" in str(e.value)
    for bad in (["--split=50,3"], ["--split=50,3,120", "--train_size=5"]):
        with pytest.raises(SystemExit):  # one usage error line, before any data is read
            npz_export.main([*bad, f"--out={tmp_path / 'x.npz'}"])
