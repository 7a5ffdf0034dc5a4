"""Reproducibility and fault tolerance of ``python -m sdjax.main``, in child processes.

Promises tested here (what is identical is stated in ``sdjax.loop``'s docstring):

* Determinism: the same config and seed run twice give bitwise-identical train states (every
  checkpoint), ``metrics.jsonl`` records without the wall-clock fields and ``results.json``
  without the invocation fields (``sdjax.loop.TIMING_METRICS`` / ``INVOCATION_RESULTS``).
* Exact resume: a run SIGKILLed at 5 seeded random points (one before the first checkpoint, one
  inside the commit of an epoch-end checkpoint, one at an epoch boundary, two anywhere) and
  rerun with the same command after each kill ends bitwise equal to an uninterrupted run, and
  every rerun resumed from the last checkpoint on disk; ``metrics.jsonl`` then equals the
  uninterrupted run's line for line (the records written after that checkpoint are dropped).
* Preemption: SIGTERM at any time -- while the data loads or between steps -- exits 0; a
  checkpoint is saved when there are steps to save, and the rerun resumes from it.
* Checkpoint safety: a corrupted checkpoint is a clear error (exit 1), the workdir unchanged.

Every child runs the tiny config (``tests/tiny_config.py``) as the trainer defaults it: scanned
stages (``scan_blocks=True``), here with the ``rbg`` key implementation, two CPU devices and a
validation split that leaves 4 steps per epoch (evaluation and best-epoch bookkeeping at steps
4 and 8 of 10). Kill points come from ``tests/kill_wrapper.py``. The reference run compiles
from scratch; the other children share a persistent compilation cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from workdir_digest import tree_digest

from sdjax import loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 10
STEPS_PER_EPOCH = 4  # (1437 - 1300) // 32
CHECKPOINTS = (3, 4, 6, 8, 9, 10)  # every 3 steps, at epoch ends and at the end
OVERRIDES = (
    f"--config=tests/tiny_config.py:steps={TOTAL_STEPS},validation_size=1300,prng_impl=rbg",
    "--config.model.scan_blocks=True",
    "--config.train.num_cpu_devices=2",
    "--config.train.eval_every_epochs=1",
    "--config.train.keep_checkpoints=10",
    "--config.train.log_every_steps=1",
    "--config.train.tensorboard=True",  # its scalars must resume exactly too
)
CHILD_TIMEOUT_S = 600
KILL_SEEDS = (0,)


class Runner:
    """Starts ``sdjax.main`` children through ``tests/kill_wrapper.py``."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.count = 0

    def env(self, cache: bool, **hooks: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDJAX_TEST_")}
        env.pop("JAX_NUM_CPU_DEVICES", None)
        env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **hooks)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        if cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(self.root / "jax_cache")
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
            # The two-device oneDNN convolutions are custom_partitioning calls, whose cache key
            # holds a per-process callback pointer: without this every child missed the cache
            # and compiled its train step again. Safe here, as every child compiles the same
            # config; in general two programs that differ only inside a partitioning callback
            # (a convolution's padding, say) would share a key.
            env["JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY"] = "true"
        return env

    @contextlib.contextmanager
    def start(self, workdir, *overrides, cache=True, **hooks):
        """Starts a child in its own process group; on exit it is killed if still running."""
        self.count += 1
        log = open(self.root / f"child_{self.count}.log", "w+")  # noqa: SIM115
        command = [sys.executable, str(REPO_ROOT / "tests" / "kill_wrapper.py")]
        proc = subprocess.Popen(
            [*command, *OVERRIDES, f"--workdir={workdir}", *overrides],
            cwd=REPO_ROOT,
            env=self.env(cache, **hooks),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log = log
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            log.close()

    def run(self, workdir, *overrides, cache=True, **hooks) -> tuple[int, str]:
        """Runs a child to completion; returns ``(exit code, combined output)``."""
        with self.start(workdir, *overrides, cache=cache, **hooks) as proc:
            rc = proc.wait(timeout=CHILD_TIMEOUT_S)
            return rc, output(proc)


def output(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def wait_for_marker(proc, marker: pathlib.Path) -> str:
    deadline = time.time() + CHILD_TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before pausing:\n{output(proc)[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"child did not pause:\n{output(proc)[-3000:]}")
        time.sleep(0.05)
    return marker.read_text()


def committed_steps(workdir: pathlib.Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def restore_state(workdir: pathlib.Path, step: int) -> dict:
    """The whole saved train state (step, params, batch_stats, opt_state), on this process's
    one device (the runs here save from two)."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    return checkpointer.restore(path, target)


def assert_trees_bitwise_equal(a, b) -> None:
    import jax  # noqa: PLC0415

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    assert flat_a, "empty state"
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def metric_records(workdir: pathlib.Path) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock fields."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in loop.TIMING_METRICS} for x in lines]


def tensorboard_scalars(workdir: pathlib.Path) -> list[tuple[int, str, float]]:
    """Every scalar in ``workdir/tensorboard`` as ``(step, tag, value)``, wall-clock tags out."""
    from tensorboard.backend.event_processing.event_file_loader import (  # noqa: PLC0415
        EventFileLoader,
    )
    from tensorboard.util import tensor_util  # noqa: PLC0415

    scalars = []
    for path in sorted((workdir / "tensorboard").iterdir()):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag not in loop.TIMING_METRICS:
                    scalars.append(
                        (event.step, value.tag, float(tensor_util.make_ndarray(value.tensor)))
                    )
    return scalars


def train_steps(workdir: pathlib.Path) -> list[int]:
    if not (workdir / "metrics.jsonl").exists():
        return []
    return [r["step"] for r in metric_records(workdir) if "train_loss" in r]


def start_line(step: int) -> str:
    """The line a run prints when it starts at ``step`` (``sdjax.loop``)."""
    if step == 0:
        return f"training {TOTAL_STEPS} steps"
    return f"resumed from the checkpoint at step {step} "


def comparable_results(workdir: pathlib.Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in loop.INVOCATION_RESULTS}


def assert_same_outcome(reference: pathlib.Path, workdir: pathlib.Path) -> None:
    """Bitwise-equal final train state, ``metrics.jsonl`` line for line, and results."""
    assert committed_steps(workdir)[-1] == TOTAL_STEPS
    assert_trees_bitwise_equal(
        restore_state(reference, TOTAL_STEPS), restore_state(workdir, TOTAL_STEPS)
    )
    assert metric_records(workdir) == metric_records(reference)
    assert tensorboard_scalars(workdir) == tensorboard_scalars(reference)
    assert comparable_results(workdir) == comparable_results(reference)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def reference(runner) -> pathlib.Path:
    """An uninterrupted run; the first child, it fills the compilation cache."""
    workdir = runner.root / "reference"
    rc, out = runner.run(workdir)
    assert rc == 0, out[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["devices"]["device_count"] == 2 and results["best_val_epoch"] in (1, 2)
    assert committed_steps(workdir) == list(CHECKPOINTS)
    return workdir


def test_same_config_and_seed_twice_is_identical_as_documented(runner, reference):
    workdir = runner.root / "again"
    rc, out = runner.run(workdir, cache=False)  # compiles from scratch too
    assert rc == 0, out[-3000:]
    assert metric_records(workdir) == metric_records(reference)
    assert comparable_results(workdir) == comparable_results(reference)
    for step in committed_steps(reference):
        assert_trees_bitwise_equal(restore_state(reference, step), restore_state(workdir, step))


def kill_points(seed: int) -> list[str]:
    """5 distinct kill events in the order a run meets them (see the module docstring)."""
    rng = np.random.default_rng(seed)
    events = {
        f"step:{rng.integers(1, CHECKPOINTS[0])}",  # before the first checkpoint
        f"commit:{rng.choice([4, 8])}",  # inside the commit of an epoch-end checkpoint
        f"step:{rng.choice([4, 8])}",  # at an epoch boundary (after its evaluation)
    }
    anywhere = [f"step:{k}" for k in range(TOTAL_STEPS)] + [f"commit:{s}" for s in CHECKPOINTS]
    while len(events) < 5:
        events.add(str(rng.choice(anywhere)))

    def order(event: str) -> tuple[int, int]:
        kind, n = event.split(":")
        return int(n), 0 if kind == "commit" else 1  # commit S comes before fetching batch S

    return sorted(events, key=order)


@pytest.mark.slow
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_random_points_then_same_command_resumes_bitwise(runner, reference, seed):
    workdir = runner.root / f"sigkill_{seed}"
    start = 0  # the step each run must start at: the last checkpoint committed before it
    for event in kill_points(seed):
        rc, out = runner.run(workdir, SDJAX_TEST_EVENT=event)
        assert rc == -signal.SIGKILL, f"{event} was not reached:\n{out[-3000:]}"
        assert start_line(start) in out, f"did not start at step {start}:\n{out[-3000:]}"
        assert not (workdir / "results.json").exists()
        if event.startswith("commit:"):  # killed mid-save: that checkpoint is not committed
            assert int(event.split(":")[1]) not in committed_steps(workdir)
        start = (committed_steps(workdir) or [0])[-1]
    rc, out = runner.run(workdir)  # the same command, no kill
    assert rc == 0, out[-3000:]
    assert start_line(start) in out, f"did not resume at step {start}:\n{out[-3000:]}"
    assert_same_outcome(reference, workdir)


@pytest.mark.slow
def test_sigterm_at_any_time_exits_zero_and_rerun_resumes(runner, reference):
    workdir = runner.root / "sigterm"
    marker = runner.root / "sigterm.marker"
    for event, expected in (("build", "Preempted at step 0"), ("step:3", "Preempted at step 4")):
        hooks = dict(
            SDJAX_TEST_EVENT=event, SDJAX_TEST_ACTION="pause", SDJAX_TEST_MARKER=str(marker)
        )
        with runner.start(workdir, **hooks) as proc:
            assert wait_for_marker(proc, marker) == event
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.5)  # let the handler run while the child is still paused
            marker.unlink()
            rc = proc.wait(timeout=CHILD_TIMEOUT_S)
            out = output(proc)
        assert rc == 0, out[-3000:]
        assert expected in out, out[-3000:]
    # Step 4 is an epoch end; the SIGTERM save at 4 replaced nothing: checkpoints 3 and 4.
    assert committed_steps(workdir) == [3, 4]
    assert not (workdir / "results.json").exists()

    rc, out = runner.run(workdir)
    assert rc == 0, out[-3000:]
    assert train_steps(workdir) == list(range(1, TOTAL_STEPS + 1))  # continued at step 5
    assert_same_outcome(reference, workdir)


def _corrupt_array_data(step_dir: pathlib.Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "no array data files found to corrupt"
    rng = np.random.default_rng(0)
    for p in files:
        p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())


def _truncate_meta(step_dir: pathlib.Path) -> None:
    files = [p for p in (step_dir / "meta").rglob("*") if p.is_file() and "commit" not in p.name]
    assert files
    for p in files:
        p.write_text(p.read_text()[:20])


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_corrupt_array_data, _truncate_meta], ids=["arrays", "meta"])
def test_corrupted_checkpoint_is_a_clear_error_and_nothing_changes(runner, reference, corrupt):
    workdir = runner.root / f"corrupt_{corrupt.__name__}"
    shutil.copytree(reference, workdir)
    corrupt(workdir / "checkpoints" / str(TOTAL_STEPS))
    before = tree_digest(workdir)
    rc, out = runner.run(
        workdir,
        f"--config.train.num_train_steps={TOTAL_STEPS + 2}",
        "--config.train.allow_config_change=True",
    )
    assert rc == 1, out[-3000:]
    assert f"checkpoint {workdir / 'checkpoints' / str(TOTAL_STEPS)}" in out, out[-3000:]
    assert "corrupted" in out
    # Handled by sdjax (no traceback through its code). Orbax/tensorstore threads may still
    # print "Event loop is closed" tracebacks at exit after the failed read (noise, not a crash).
    assert f'File "{REPO_ROOT / "sdjax"}' not in out, out[-3000:]
    assert tree_digest(workdir) == before
