"""One CPU device vs eight (``JAX_NUM_CPU_DEVICES=8``), each in a fresh child process.

Promises tested:

* The same global batch on 1 device and sharded over 8 gives the same losses over 20 steps,
  within float tolerance (only the order of cross-device reductions differs):
  - the whole loop (``sdjax.train.train_and_evaluate``, 20 steps, per-step losses and test
    accuracy) without drop path;
  - every one of 20 train steps with drop path at rate 0.5, in row and in batch mode: loss,
    accuracy and the whole new state, each step started from the same state on both.
  Why not the whole loop with drop path: training this tiny ResNet with stochastic depth
  amplifies any 1e-7 difference (the float noise of a different reduction order) to percent
  level within ~10 steps, on a single device too (perturbing the parameters by 1e-5 does the
  same), so trajectories cannot be compared within float tolerance; comparing each step from
  the same state tests the same thing (masks, gates, augmentation, BatchNorm over the global
  batch) exactly.
* Per-sample masks of the layers are independent across shards (each shard draws its own rows,
  the sharded mask equals the unsharded one), and the batch-mode gate is the same on every
  device, including the skipped branch of ``DropPathResidual`` (``nn.cond``) and its
  BatchNorm statistics.

The ops-level version of the mask checks is in ``test_sharded_masks.py``; these go through the
Linen and NNX layers and the training code.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 20
MODES = ("row", "batch")

# The whole loop, 20 steps, without drop path: see the module docstring for why.
TRAIN_SCRIPT = textwrap.dedent(
    f"""
    import os, sys
    import jax
    from configs import digits_sd
    from sdjax import train

    workdir, expected_devices = sys.argv[1], int(sys.argv[2])
    assert jax.device_count() == expected_devices, jax.devices()
    config = digits_sd.get_config()
    config.model.name = "cifar_resnet20"
    config.model.widths = (4, 4, 8)
    config.model.scan_blocks = False
    config.model.final_drop_rate = 0.0
    config.train.batch_size = 32
    config.train.eval_batch_size = 360
    config.train.num_train_steps = {NUM_STEPS}
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 1000
    config.train.progress_bar = False
    train.train_and_evaluate(config, workdir)
    print("OK")
    """
)

# Each of 20 steps with drop path (rate 0.5, row and batch mode) on 1 device and on 8, both
# from the same state (the 1-device trajectory), so that only the step itself is compared.
STEP_SCRIPT = textwrap.dedent(
    f"""
    import functools
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from configs import digits_sd
    from sdjax import data as data_lib, optim, train

    assert jax.device_count() == 8, jax.devices()
    for mode in {MODES!r}:
        config = digits_sd.get_config()
        config.model.name = "cifar_resnet20"
        config.model.widths = (4, 4, 8)
        config.model.scan_blocks = False
        config.model.final_drop_rate = 0.5
        config.model.drop_mode = mode
        config.model.scale_by_keep = mode == "row"
        data = data_lib.create(config.input)
        tx = optim.create(config.optim, {NUM_STEPS}, data.steps_per_epoch(32))
        model = train.create_model(config)
        key = jax.random.key(0)
        steps = {{}}
        for n in (1, 8):
            mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
            rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            fn = jax.jit(
                functools.partial(
                    train.train_step, augment_kwargs=data.augment_kwargs(), num_classes=10
                ),
                in_shardings=(rep, sharded, rep),
                out_shardings=(rep, rep),
            )
            steps[n] = (rep, sharded, fn)
        init = functools.partial(train.create_train_state, config, model, (8, 8, 1), tx=tx)
        state = jax.jit(init)(key)
        for step in range({NUM_STEPS}):
            batch = data.train_batch(config.seed, step, 32)
            out = {{}}
            for n, (rep, sharded, fn) in steps.items():
                global_batch = {{k: jax.device_put(v, sharded) for k, v in batch.items()}}
                out[n] = fn(jax.device_put(state, rep), global_batch, jax.device_put(key, rep))
            (one, m1), (eight, m8) = out[1], out[8]
            np.testing.assert_allclose(
                float(m8["loss"]), float(m1["loss"]), rtol=1e-5, err_msg=f"{{mode}} {{step}}"
            )
            assert float(m8["accuracy"]) == float(m1["accuracy"]), (mode, step)
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
            state = one
    print("OK")
    """
)

LAYERS_SCRIPT = textwrap.dedent(
    """
    import itertools
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sdjax import layers, nnx as sd_nnx

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    rows_per_shard = 512
    x = jnp.ones((8 * rows_per_shard, 3))
    xs = jax.device_put(x, sharded)

    def shard_rows(out):
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
        return np.stack([np.asarray(s.data)[:, 0] != 0 for s in shards])  # [8, rows] kept?

    # Row mode, Linen and NNX: each shard its own rows, independent of the other shards.
    linen_row = layers.StochasticDepth(0.5, mode="row", deterministic=False)
    nnx_row = sd_nnx.StochasticDepth(0.5, mode="row", rngs=nnx.Rngs(dropout=0))
    row_fns = {
        "linen": jax.jit(lambda x, k: linen_row.apply({}, x, rng=k)),
        "nnx": jax.jit(lambda x, k: nnx_row(x, rngs=k)),
    }
    for name, fn in row_fns.items():
        for seed in range(3):
            key = jax.random.key(seed)
            out = fn(xs, key)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(x, key)), err_msg=name)
            kept = shard_rows(out)
            assert abs(kept.mean() - 0.5) < 0.03, (name, kept.mean())
            for a, b in itertools.combinations(range(8), 2):
                agree = np.mean(kept[a] == kept[b])  # 0.5 for independent fair masks
                assert abs(agree - 0.5) < 0.1, (name, seed, a, b, agree)

    # Batch mode: one gate for the whole global batch, the same on every device.
    class Branch(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            y = nn.Dense(3, kernel_init=nn.initializers.ones)(x)
            return nn.BatchNorm(use_running_average=not train)(y) + 1.0

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, key):
            y = layers.StochasticDepth(0.5, mode="batch", deterministic=False)(x, rng=key)
            res = layers.DropPathResidual(Branch(), rate=0.5, mode="batch", deterministic=False)
            return y, res(x, jnp.zeros_like(x), rng=key, train=True)

    net = Net()
    variables = net.init(jax.random.key(0), x[:8], jax.random.key(0))
    apply = jax.jit(lambda v, x, k: net.apply(v, x, k, mutable=["batch_stats"]))
    gates = []
    for seed in range(16):
        key = jax.random.key(seed)
        (y, res), new_vars = apply(variables, xs, key)
        (y1, res1), new_vars1 = apply(variables, x, key)
        per_device = {float(np.asarray(s.data).max()) for s in y.addressable_shards}
        assert len(per_device) == 1, ("StochasticDepth gate differs across devices", per_device)
        residual_kept = {bool(np.asarray(s.data).any()) for s in res.addressable_shards}
        assert len(residual_kept) == 1, "DropPathResidual gate differs across devices"
        gate = per_device.pop() != 0
        assert residual_kept.pop() == gate  # same key -> same gate (ops.batch_keep)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))
        np.testing.assert_allclose(np.asarray(res), np.asarray(res1), rtol=1e-6)
        stats = jax.tree.leaves(new_vars["batch_stats"])
        old = jax.tree.leaves(variables["batch_stats"])
        changed = any(not np.array_equal(a, b) for a, b in zip(stats, old))
        assert changed == gate, "a skipped branch must leave its batch_stats untouched"
        gates.append(gate)
    assert 0 < sum(gates) < len(gates), gates
    print("OK")
    """
)


def _run_child(args: list[str], num_devices: int, timeout: int = 600) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert "OK" in out
    return out


@pytest.mark.slow
def test_one_device_and_eight_devices_give_the_same_losses_over_20_steps(tmp_path, train_losses):
    # All three children run at once (2 cores); they are killed if anything fails.
    procs = [
        _run_child(["-c", TRAIN_SCRIPT, str(tmp_path / "dev1"), "1"], 1),
        _run_child(["-c", TRAIN_SCRIPT, str(tmp_path / "dev8"), "8"], 8),
        _run_child(["-c", STEP_SCRIPT], 8),
    ]
    try:
        for proc in procs:
            _finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.communicate()
    one, eight = tmp_path / "dev1", tmp_path / "dev8"
    assert json.loads((eight / "results.json").read_text())["devices"]["device_count"] == 8
    assert json.loads((one / "results.json").read_text())["devices"]["device_count"] == 1
    loss_one, loss_eight = train_losses(one, NUM_STEPS), train_losses(eight, NUM_STEPS)
    assert np.all(np.isfinite(loss_one))
    np.testing.assert_allclose(loss_eight, loss_one, rtol=2e-5, atol=1e-6)
    acc = [json.loads((d / "results.json").read_text())["test_accuracy"] for d in (one, eight)]
    assert abs(acc[0] - acc[1]) <= 1 / 360, acc  # at most one test image flips


@pytest.mark.slow
def test_layer_masks_independent_per_shard_and_batch_gate_same_on_every_device():
    _finish(_run_child(["-c", LAYERS_SCRIPT], 8))
