"""Two hosts (local processes x 4 CPU devices, ``jax.distributed`` on 127.0.0.1) vs one host
with 8 CPU devices, both through ``sdjax.loop.train_and_evaluate``.

Promises tested:

* The same config gives the same per-step losses, the same test accuracy and the same final
  parameters (within float tolerance: cross-process reductions may be ordered differently), and
  the two hosts hold identical parameter replicas.
* Each host reads only its shard of every global batch: the batches each process gathered
  (recorded in the child) are exactly its contiguous half of the global batch of that step,
  the halves are disjoint and together form the global batch.

Collectives between the CPU processes use gloo. Every child has a timeout; if one fails, the
others are killed at once (a lone host would wait forever in a collective).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import child_command

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8
BATCH_SIZE = 32
TIMEOUT_S = 600


def host(out_dir, workdir, process_id, num_processes, port) -> None:
    """One host of the run (a child process): records what it reads and what it checkpoints."""
    import jax  # noqa: PLC0415

    process_id, num_processes = int(process_id), int(num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import tiny_config  # noqa: PLC0415

    from sdjax import checkpoint, loop, runtime  # noqa: PLC0415
    from sdjax.data import pipeline  # noqa: PLC0415

    reads = []
    original_batch = pipeline.InMemoryData.train_batch

    def train_batch(self, seed, step, batch_size, process_index=0, process_count=1):
        batch = original_batch(self, seed, step, batch_size, process_index, process_count)
        reads.append(
            {
                "step": int(step),
                "process_index": process_index,
                "process_count": process_count,
                "labels": batch["label"].tolist(),
                "image_sha": [hashlib.sha256(x.tobytes()).hexdigest() for x in batch["image"]],
            }
        )
        return batch

    pipeline.InMemoryData.train_batch = train_batch
    saved = {}
    original_save = checkpoint.Checkpointer.save

    def save(self, step, state, meta):
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        saved.clear()
        saved.update({jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in flat})
        return original_save(self, step, state, meta)

    checkpoint.Checkpointer.save = save

    config = tiny_config.get_config(f"steps={NUM_STEPS},mode=row,batch_size={BATCH_SIZE}")
    config.model.scale_by_keep = True
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 1000
    if num_processes > 1:
        config.train.distributed = True
        config.train.coordinator_address = f"127.0.0.1:{port}"
        config.train.num_processes = num_processes
        config.train.process_id = process_id
    runtime.setup(config)  # jax.distributed.initialize, as python -m sdjax.main does
    results = loop.train_and_evaluate(config, str(workdir))
    assert jax.process_count() == num_processes and jax.device_count() == 8
    assert jax.local_device_count() == 8 // num_processes
    np.savez(os.path.join(out_dir, f"params_{process_id}.npz"), **saved)
    with open(os.path.join(out_dir, f"reads_{process_id}.json"), "w") as f:
        json.dump({"reads": reads, "test_accuracy": results["test_accuracy"]}, f)
    print("OK", process_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out_dir, workdir, process_id, num_processes, port, local_devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(local_devices))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    log = open(out_dir / f"log_{process_id}.txt", "w+")  # noqa: SIM115
    args = [out_dir, workdir, process_id, num_processes, port]
    proc = subprocess.Popen(
        child_command(host, *args),
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log = log
    return proc


def _log(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()[-4000:]


def _wait_all(procs: list[subprocess.Popen]) -> None:
    """Waits for all children; kills all of them when one fails or time runs out."""
    deadline = time.time() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                pytest.fail(f"a child failed ({failed[0].returncode}):\n{_log(failed[0])}")
            if time.time() > deadline:
                pytest.fail(f"children did not finish in {TIMEOUT_S} s:\n{_log(procs[0])}")
            time.sleep(0.2)
        for p in procs:
            assert p.returncode == 0, _log(p)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            p.wait(timeout=60)
            p.log.close()


@pytest.mark.slow
def test_two_hosts_match_one_host_and_each_reads_only_its_shard(tmp_path, train_losses):
    one, two = tmp_path / "one_host", tmp_path / "two_hosts"
    one.mkdir()
    two.mkdir()
    port = _free_port()
    procs = [
        _start(two, two / "workdir", 0, 2, port, 4),
        _start(two, two / "workdir", 1, 2, port, 4),
        _start(one, one / "workdir", 0, 1, 0, 8),
    ]
    _wait_all(procs)

    # Same losses, accuracy and parameters; both hosts hold the same replica.
    np.testing.assert_allclose(
        train_losses(two / "workdir", NUM_STEPS),
        train_losses(one / "workdir", NUM_STEPS),
        rtol=2e-4,
        atol=1e-5,
    )
    reference = np.load(one / "params_0.npz")
    host0, host1 = np.load(two / "params_0.npz"), np.load(two / "params_1.npz")
    assert sorted(host0.files) == sorted(reference.files) == sorted(host1.files)
    assert reference.files
    for name in reference.files:
        np.testing.assert_array_equal(host0[name], host1[name], err_msg=name)
        np.testing.assert_allclose(host0[name], reference[name], rtol=1e-3, atol=1e-5)
    accuracy = [json.loads((d / "reads_0.json").read_text())["test_accuracy"] for d in (one, two)]
    assert abs(accuracy[0] - accuracy[1]) <= 2 / 360, accuracy
    assert (two / "workdir" / "results.json").exists()

    # Each host read exactly its half of each global batch (the one-host run read it all).
    reads = [json.loads((two / f"reads_{i}.json").read_text())["reads"] for i in (0, 1)]
    global_reads = json.loads((one / "reads_0.json").read_text())["reads"]
    assert [r["step"] for r in global_reads] == list(range(NUM_STEPS))
    local = BATCH_SIZE // 2
    for i, host_reads in enumerate(reads):
        assert [r["step"] for r in host_reads] == list(range(NUM_STEPS))
        for mine, full in zip(host_reads, global_reads, strict=True):
            assert (mine["process_index"], mine["process_count"]) == (i, 2)
            assert len(mine["labels"]) == local
            assert mine["image_sha"] == full["image_sha"][i * local : (i + 1) * local]
            assert mine["labels"] == full["labels"][i * local : (i + 1) * local]
    # The two halves are disjoint and cover the batch, whose examples are distinct (a slice of
    # the epoch's permutation).
