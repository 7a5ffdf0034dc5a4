"""Shared fixtures: the tiny config, CIFAR-10 in tfds layout (real or fake), torch (required
under CI), a run's losses."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA:CPU at LLVM optimization level 0 for this process and every child it starts: compiling
# dominates these tests' time (about half of it goes to LLVM's passes) and the programs (the HLO
# sdjax emits, float semantics) are the same. Set the level in XLA_FLAGS to test at another one;
# the benchmarks (experiments/) run at XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
TINY_CONFIG_FILE = TESTS / "tiny_config.py"
# The real CIFAR-10 lies beside the repository (../shared/data/tfds) on developer machines and
# in CI; a user's clone has none, and the tests that need it then read a fake one (below).
TFDS_DATA_DIR = pathlib.Path(
    os.environ.get("SDJAX_TEST_TFDS_DIR", REPO_ROOT.parent / "shared" / "data" / "tfds")
)
REAL_CIFAR10 = (TFDS_DATA_DIR / "cifar10").is_dir()

sys.path.insert(0, str(TESTS))
import tiny_config as _tiny  # noqa: E402


def _cifar10_line() -> str:
    if REAL_CIFAR10:
        return f"sdjax: CIFAR-10 tests read the real dataset at {TFDS_DATA_DIR}"
    return (
        f"sdjax: real CIFAR-10 not found at {TFDS_DATA_DIR} (set SDJAX_TEST_TFDS_DIR): the "
        "CIFAR-10 tests read a fake tfds cifar10 (random images, same reading code)"
    )


def pytest_report_header(config):
    return _cifar10_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_cifar10_line())


def child_command(function, *args) -> list[str]:
    """``python -c`` argv that calls ``function(*args)`` (a module-level function of a test
    module) in a fresh process, e.g. one that sets ``JAX_NUM_CPU_DEVICES`` first."""
    module = function.__module__
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module}; "
        f"{module}.{function.__name__}(*sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *map(str, args)]


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture
def tiny_config():
    """``make(arg=None) -> ConfigDict``: ``tests/tiny_config.py`` with an argument string."""
    return _tiny.get_config


def write_fake_cifar10(data_dir: pathlib.Path, num_train: int = 5256, num_test: int = 128) -> None:
    """Writes a cifar10 of random images with tfds' own writer (``tfds build`` layout).

    5,256 training images: the paper's recipe holds out 5,000 for validation, and two batches
    of 128 remain (the configs validate against this data as against the real one).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415

    version = str(tfds.builder_cls("cifar10").VERSION)
    features = tfds.builder("cifar10", data_dir=str(data_dir)).info.features
    rng = np.random.default_rng(0)

    def examples(split, n):
        return [
            (f"{split}_{i}", {"id": f"{split}_{i}", "label": i % 10,
                              "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)})
            for i in range(n)
        ]  # fmt: skip

    tfds.dataset_builders.store_as_tfds_dataset(
        name="cifar10",
        version=version,
        features=features,
        split_datasets={"train": examples("train", num_train), "test": examples("test", num_test)},
        config=None,
        data_dir=str(data_dir),
    )


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> pathlib.Path:
    """A tfds folder with cifar10: the real one if present, else a fake (see the summary line).

    With ``CI=true`` a missing real dataset fails the test: CI must exercise the real data.
    """
    if REAL_CIFAR10:
        return TFDS_DATA_DIR
    if in_ci():
        pytest.fail(
            f"CI=true but the real CIFAR-10 is not at {TFDS_DATA_DIR}/cifar10: put the tfds "
            "folder beside the repository (../shared/data/tfds) or set SDJAX_TEST_TFDS_DIR"
        )
    fake = tmp_path_factory.mktemp("fake_tfds")
    write_fake_cifar10(fake)
    return fake


def in_ci() -> bool:
    """Whether the CI service runs these tests (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def torch():
    """The ``torch`` module, for the PyTorch peer's equivalence tests (``pip install -e
    ".[bench]"``). Without it these tests skip, except under ``CI=true``, where they fail: CI
    must run them."""
    try:
        import torch  # noqa: PLC0415
    except ImportError as error:
        reason = f'PyTorch is not installed ({error}): pip install -e ".[bench]"'
        if in_ci():
            pytest.fail(f"CI must run the PyTorch equivalence tests: {reason}")
        pytest.skip(reason)
    return torch


@pytest.fixture(scope="session")
def train_losses():
    """``read(workdir, num_steps) -> np.ndarray``: the train losses a run logged to
    ``metrics.jsonl`` (it must have logged every step 1 .. num_steps, in order)."""

    def read(workdir: pathlib.Path, num_steps: int) -> np.ndarray:
        lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
        train = [r for r in map(json.loads, lines) if "train_loss" in r]
        assert [r["step"] for r in train] == list(range(1, num_steps + 1))
        return np.array([r["train_loss"] for r in train])

    return read


@pytest.fixture
def no_compile(monkeypatch):
    """Makes any ``jax.jit`` call fail the test: what it guards is checked before compiling."""
    import jax  # noqa: PLC0415

    def jit(*args, **kwargs):
        raise AssertionError("jax.jit was called before the bad input was reported")

    monkeypatch.setattr(jax, "jit", jit)
