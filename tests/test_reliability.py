"""Reproducibility and fault tolerance of ``python -m sdjax.main`` (issue: reliability).

Promises tested here, each on the real command line in child processes:

* Determinism: the same config and seed run twice gives bitwise-identical metrics, results and
  train state (parameters, BatchNorm statistics, optimizer state, step).
* Exact resume: a run killed with SIGKILL in the middle of an epoch and rerun with the same
  command ends bitwise equal to an uninterrupted run, and it resumed (did not restart).
* Preemption: SIGTERM saves a checkpoint at the next step and exits 0; the rerun resumes from it.
* Checkpoint safety: SIGKILL during a save (after the data is written, before the commit) leaves
  the previous checkpoint as the latest, loadable one; a corrupted or incompatible checkpoint is
  a clear error (exit 1) and the workdir is left exactly as it was.

Every child runs a tiny digits ResNet-20 for 10 steps (one epoch is 44 steps, so every kill is
mid-epoch). The kill points are made deterministic by a small wrapper that pauses the child at a
chosen step (or inside orbax's commit of a chosen checkpoint) and tells the test so through a
marker file; the signal itself comes from the test, as it would from a scheduler. The two
reference runs compile from scratch; the other children share a persistent compilation cache to
keep the file fast (the cache holds the reference's executables). Under pytest-xdist the workers
share the reference run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 10
CHECKPOINT_EVERY = 3
STEPS_PER_EPOCH = (1797 - 360) // 32  # digits train split / batch size = 44: all kills mid-epoch
TIMING_KEYS = {"examples_per_s", "epoch_time_s"}  # wall-clock metrics, the only ones that vary
CHILD_TIMEOUT_S = 600

# A tiny config file: the digits default with a narrow ResNet-20 and frequent checkpoints.
TINY_CONFIG = textwrap.dedent(
    f"""
    from configs import digits_sd
    from sdjax.config_utils import apply_arg


    def get_config(arg=None):
        config = digits_sd.get_config()
        config.model.name = "cifar_resnet20"
        config.model.widths = (4, 4, 8)
        config.model.scan_blocks = False
        config.train.batch_size = 32
        config.train.num_train_steps = {TOTAL_STEPS}
        config.train.checkpoint_every_steps = {CHECKPOINT_EVERY}
        config.train.keep_checkpoints = 10  # all of them, to compare step by step
        config.train.log_every_steps = 1
        config.train.progress_bar = False
        return apply_arg(config, arg)
    """
)

# Runs `python -m sdjax.main` unchanged, except for optional pauses that make kill points exact:
#   SDJAX_TEST_PAUSE_AT_STEP=k: pause when the batch of step k (0-based) is fetched, i.e. after
#     steps 0..k-1 were dispatched, first waiting for checkpoint SDJAX_TEST_WAIT_FOR_CHECKPOINT.
#   SDJAX_TEST_PAUSE_IN_COMMIT=s: pause inside orbax's commit (rename) of checkpoint s, after
#     all its data was written.
# A pause writes SDJAX_TEST_MARKER and lasts while that file exists (the test deletes it to let
# the child continue, e.g. after SIGTERM).
WRAPPER = textwrap.dedent(
    """
    import os, runpy, sys, time

    marker = os.environ.get("SDJAX_TEST_MARKER")


    def pause(what):
        with open(marker + ".tmp", "w") as f:
            f.write(what)
        os.replace(marker + ".tmp", marker)
        deadline = time.time() + 300
        while os.path.exists(marker):
            if time.time() > deadline:
                os._exit(3)
            time.sleep(0.02)


    pause_step = int(os.environ.get("SDJAX_TEST_PAUSE_AT_STEP", "-1"))
    if pause_step >= 0:
        from sdjax.data import pipeline

        original_batch = pipeline.InMemoryData.train_batch
        wait_for = os.environ.get("SDJAX_TEST_WAIT_FOR_CHECKPOINT")

        def train_batch(self, seed, step, *args, **kwargs):
            if step == pause_step:
                if wait_for:
                    deadline = time.time() + 300
                    while not os.path.isdir(wait_for) and time.time() < deadline:
                        time.sleep(0.02)
                pause(f"step {step}")
            return original_batch(self, seed, step, *args, **kwargs)

        pipeline.InMemoryData.train_batch = train_batch

    commit_step = os.environ.get("SDJAX_TEST_PAUSE_IN_COMMIT")
    if commit_step:
        from orbax.checkpoint._src.path import atomicity

        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            if self.get_final().name == commit_step:
                pause(f"commit {commit_step}")
            return await original_finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize

    sys.argv[0] = "sdjax.main"
    runpy.run_module("sdjax.main", run_name="__main__", alter_sys=True)
    """
)


def _write_atomically(path: pathlib.Path, text: str) -> pathlib.Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class Runner:
    """Starts ``sdjax.main`` children on the tiny config; kills whatever it started."""

    def __init__(self, root: pathlib.Path, name: str):
        self.root = root
        self.name = name
        self.config = _write_atomically(root / "tiny_config.py", TINY_CONFIG)
        self.wrapper = _write_atomically(root / "wrapper.py", WRAPPER)
        self.cache = root / "jax_cache"
        self.count = 0

    def command(self, workdir: pathlib.Path, *overrides: str) -> list[str]:
        return [
            sys.executable,
            str(self.wrapper),
            f"--config={self.config}",
            f"--workdir={workdir}",
            *overrides,
        ]

    def env(self, cache: bool, **hooks: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDJAX_TEST_")}
        env.pop("JAX_NUM_CPU_DEVICES", None)
        env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **hooks)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        if cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(self.cache)
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        return env

    @contextlib.contextmanager
    def start(self, workdir, *overrides, cache=True, **hooks):
        """Starts a child in its own process group; on exit it is killed if still running."""
        self.count += 1
        log = open(self.root / f"child_{self.name}_{self.count}.log", "w+")  # noqa: SIM115
        proc = subprocess.Popen(
            self.command(workdir, *overrides),
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

    def run(self, workdir, *overrides, cache=True) -> tuple[int, str]:
        """Runs a child to completion; returns ``(exit code, combined output)``."""
        with self.start(workdir, *overrides, cache=cache) as proc:
            rc = proc.wait(timeout=CHILD_TIMEOUT_S)
            return rc, output(proc)


def output(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def wait_for_marker(proc, marker: pathlib.Path, timeout: float = CHILD_TIMEOUT_S) -> str:
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before pausing:\n{output(proc)[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"child did not pause within {timeout} s:\n{output(proc)[-3000:]}")
        time.sleep(0.05)
    return marker.read_text()


def committed_steps(workdir: pathlib.Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def restore_state(workdir: pathlib.Path, step: int) -> dict:
    """The whole saved train state (step, params, batch_stats, opt_state) as NumPy arrays."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return restored["state"]


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
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def final_metrics_by_step(workdir: pathlib.Path) -> dict[int, dict]:
    """The last train-metrics record of each step (a resumed run appends to the same log)."""
    return {r["step"]: r for r in metric_records(workdir) if "train_loss" in r}


def resumed_from(workdir: pathlib.Path) -> list[int]:
    """Steps at which the train-metrics log starts again (a rerun appends after its restore)."""
    steps = [r["step"] for r in metric_records(workdir) if "train_loss" in r]
    return [b - 1 for a, b in zip(steps, steps[1:], strict=False) if b <= a]


def tree_digest(path: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (to prove nothing changed)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_same_outcome(reference: pathlib.Path, workdir: pathlib.Path) -> None:
    """Bitwise-equal final train state, per-step train metrics and test results."""
    assert committed_steps(workdir)[-1] == TOTAL_STEPS
    assert_trees_bitwise_equal(
        restore_state(reference, TOTAL_STEPS), restore_state(workdir, TOTAL_STEPS)
    )
    assert final_metrics_by_step(workdir) == final_metrics_by_step(reference)
    ref = json.loads((reference / "results.json").read_text())
    got = json.loads((workdir / "results.json").read_text())
    for key in ("test_accuracy", "test_loss", "steps", "final_train_loss", "num_params"):
        assert got[key] == ref[key], key


@contextlib.contextmanager
def _exclusive(lock_file: pathlib.Path):
    """An inter-process lock (pytest-xdist workers share the reference run)."""
    import fcntl  # noqa: PLC0415 (POSIX only, like the signals tested here)

    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return Runner(tmp_path_factory.mktemp("reliability"), "main")
    # Under xdist, the workers of one session share a folder (and so the reference run).
    root = tmp_path_factory.getbasetemp().parent / "reliability"
    root.mkdir(exist_ok=True)
    with _exclusive(root.parent / "reliability.lock"):
        return Runner(root, worker)


@pytest.fixture(scope="module")
def reference(runner) -> pathlib.Path:
    """An uninterrupted run, made once. It is the first child, so it compiles from scratch (and
    fills the compilation cache that the kill tests' children use)."""
    workdir = runner.root / "reference"
    done = runner.root / "reference.done"
    with _exclusive(runner.root / "reference.lock"):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt of another worker
            rc, out = runner.run(workdir)
            assert rc == 0, out[-3000:]
            assert (workdir / "results.json").exists()
            done.touch()
    return workdir


def test_same_config_and_seed_twice_is_bitwise_identical(runner, reference):
    workdir = runner.root / "again"
    rc, out = runner.run(workdir, cache=False)  # compiles from scratch too
    assert rc == 0, out[-3000:]
    assert metric_records(workdir) == metric_records(reference)
    assert_same_outcome(reference, workdir)
    for step in committed_steps(reference):
        assert_trees_bitwise_equal(restore_state(reference, step), restore_state(workdir, step))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_resumes_bitwise(runner, reference):
    assert TOTAL_STEPS < STEPS_PER_EPOCH
    workdir = runner.root / "sigkill"
    marker = runner.root / "sigkill.marker"
    with runner.start(
        workdir,
        SDJAX_TEST_PAUSE_AT_STEP="8",
        SDJAX_TEST_WAIT_FOR_CHECKPOINT=str(workdir / "checkpoints" / "6"),
        SDJAX_TEST_MARKER=str(marker),
    ) as proc:
        assert wait_for_marker(proc, marker) == "step 8"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (workdir / "results.json").exists()
    assert committed_steps(workdir)[-1] == 6

    rc, out = runner.run(workdir)  # the same command, no hooks
    assert rc == 0, out[-3000:]
    assert resumed_from(workdir) == [6], "the rerun did not resume from the last checkpoint"
    assert_same_outcome(reference, workdir)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_rerun_resumes(runner, reference):
    workdir = runner.root / "sigterm"
    marker = runner.root / "sigterm.marker"
    with runner.start(workdir, SDJAX_TEST_PAUSE_AT_STEP="3", SDJAX_TEST_MARKER=str(marker)) as proc:
        wait_for_marker(proc, marker)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)  # let the handler run while the child is still paused
        marker.unlink()
        rc = proc.wait(timeout=CHILD_TIMEOUT_S)
        out = output(proc)
    assert rc == 0, out[-3000:]
    assert "Preempted at step 4" in out
    # Step 4 is no periodic checkpoint (every 3 steps): it was written because of SIGTERM.
    assert committed_steps(workdir) == [3, 4]
    assert not (workdir / "results.json").exists()

    rc, out = runner.run(workdir)
    assert rc == 0, out[-3000:]
    # One unbroken log 1..10: the rerun continued at step 5 (a restart would repeat 1..4).
    steps = [r["step"] for r in metric_records(workdir) if "train_loss" in r]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    assert_same_outcome(reference, workdir)


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(runner, reference):
    workdir = runner.root / "kill_in_save"
    marker = runner.root / "kill_in_save.marker"
    with runner.start(workdir, SDJAX_TEST_PAUSE_IN_COMMIT="6", SDJAX_TEST_MARKER=str(marker)) as p:
        assert wait_for_marker(p, marker) == "commit 6"
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    names = sorted(x.name for x in (workdir / "checkpoints").iterdir())
    assert committed_steps(workdir) == [3], names
    assert any(n.startswith("6.") for n in names), f"no half-written checkpoint 6: {names}"
    state = restore_state(workdir, 3)
    assert int(state["step"]) == 3
    assert_trees_bitwise_equal(state, restore_state(reference, 3))

    rc, out = runner.run(workdir)
    assert rc == 0, out[-3000:]
    assert resumed_from(workdir) == [3]
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
    rc, out = runner.run(workdir, f"--config.train.num_train_steps={TOTAL_STEPS + 2}")
    assert rc == 1, out[-3000:]
    assert f"checkpoint {workdir / 'checkpoints' / str(TOTAL_STEPS)}" in out, out[-3000:]
    assert "corrupted" in out
    # Handled by sdjax (no traceback through its code). Orbax/tensorstore threads may still
    # print "Event loop is closed" tracebacks at exit after the failed read (noise, not a crash).
    assert f'File "{REPO_ROOT / "sdjax"}' not in out, out[-3000:]
    assert tree_digest(workdir) == before


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error_and_nothing_changes(runner, reference):
    workdir = runner.root / "other_model"
    shutil.copytree(reference, workdir)
    before = tree_digest(workdir)
    rc, out = runner.run(workdir, "--config.model.widths=(4, 8, 8)")
    assert rc == 1, out[-3000:]
    assert "different parameter shapes" in out and "nothing was loaded" in out
    assert tree_digest(workdir) == before
