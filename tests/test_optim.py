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
