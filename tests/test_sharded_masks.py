"""Masks of sdjax.ops under a batch sharded over 8 CPU devices (in a fresh child process, so
that the pytest process keeps its single device)."""

import os
import subprocess

import numpy as np
import pytest
from conftest import REPO_ROOT, child_command


def sharded_masks() -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from sdjax import ops  # noqa: PLC0415

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    key = jax.random.key(0)
    x = jnp.ones((8 * 64, 4))
    xs = jax.device_put(x, sharding)

    row = jax.jit(lambda x, k: ops.drop_path(x, 0.5, key=k, mode="row"))
    batch = jax.jit(lambda x, k: ops.drop_path(x, 0.5, key=k, mode="batch"))
    out = row(xs, key)
    assert out.sharding.is_equivalent_to(sharding, out.ndim), out.sharding
    # Shards get different masks ...
    shard_masks = np.stack([np.asarray(s.data)[:, 0] for s in out.addressable_shards])
    assert len({m.tobytes() for m in shard_masks}) == 8, "shards drew identical masks"
    # ... and the global mask equals the unsharded one (threefry partitionable).
    np.testing.assert_array_equal(np.asarray(out), np.asarray(row(x, key)))
    # Batch mode: one gate for the whole sharded batch, the same as unsharded.
    for seed in range(4):
        k = jax.random.key(seed)
        b = batch(xs, k)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(batch(x, k)))
        assert len({float(np.asarray(s.data).max()) for s in b.addressable_shards}) == 1
    # Dropout too.
    d = jax.jit(lambda x, k: ops.dropout(x, 0.5, key=k))
    np.testing.assert_array_equal(np.asarray(d(xs, key)), np.asarray(d(x, key)))
    print("OK")


@pytest.mark.slow
def test_sharded_masks_differ_per_shard_and_match_unsharded():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        child_command(sharded_masks), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
