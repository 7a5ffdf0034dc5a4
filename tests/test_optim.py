"""Tests of sdjax.optim: learning-rate schedules and warm-up."""

import pytest

from sdjax import config, optim


def test_step_schedule_and_constant_warmup():
    oc = config.default_config().optim
    lr = optim.learning_rate_schedule(oc, total_steps=100, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001]
    )
    oc.warmup_steps, oc.warmup_type, oc.warmup_factor = 4, "constant", 0.1
    lr = optim.learning_rate_schedule(oc, total_steps=100, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 3, 4)] == pytest.approx([0.01, 0.01, 0.1])


def test_adamw_decays_kernels_decoupled_from_the_gradient():
    """With a zero gradient Adam's update is 0, so one AdamW step is exactly ``-lr * wd * p`` on
    kernels and nothing elsewhere; L2 decay (SGD's) would instead feed ``wd * p`` into Adam."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    c = config.default_config().optim
    c.optimizer, c.learning_rate, c.weight_decay, c.weight_decay_on = "adamw", 0.5, 0.1, "kernels"
    c.lr_schedule = "constant"
    tx = optim.create(c, total_steps=10, steps_per_epoch=5)
    params = {"dense": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    zeros = {"dense": {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], [-0.5 * 0.1 * 2.0] * 2, rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], [0.0, 0.0])
    ones = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    updates, _ = tx.update(ones, tx.init(params), params)
    # First Adam step: m / sqrt(v) = 1 (bias-corrected), so -lr * (1 + wd * p) on kernels.
    np.testing.assert_allclose(updates["dense"]["kernel"], [-0.5 * (1 + 0.2)] * 2, rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], [-0.5] * 2, rtol=1e-5)
