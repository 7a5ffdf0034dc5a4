"""Shared fixtures: where the repository and the real CIFAR-10 (tfds layout) live; a run's losses."""

import json
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The real CIFAR-10 lies beside the repository (../shared/data/tfds), on developer machines and in CI.
TFDS_DATA_DIR = pathlib.Path(
    os.environ.get("SDJAX_TEST_TFDS_DIR", REPO_ROOT.parent / "shared" / "data" / "tfds")
)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tfds_data_dir() -> pathlib.Path:
    """The read-only tfds folder with cifar10/3.0.2; a missing folder fails the test, it is never skipped."""
    if not (TFDS_DATA_DIR / "cifar10").is_dir():
        pytest.fail(
            f"real CIFAR-10 not found at {TFDS_DATA_DIR}/cifar10: put the tfds folder beside the repository "
            "(../shared/data/tfds) or set SDJAX_TEST_TFDS_DIR"
        )
    return TFDS_DATA_DIR


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
