"""Tests of sdjax.schedules: the published per-block drop-rate rules and their validation."""

import pytest

from sdjax import schedules


def test_linear_decay_is_the_papers_rule():
    rates = schedules.linear_decay(4, 0.5)
    assert rates == pytest.approx((0.125, 0.25, 0.375, 0.5))
    assert rates[-1] == 0.5  # the last block gets exactly final_rate
    assert schedules.linear_decay(0, 0.5) == ()
    # CIFAR ResNet-110: 54 blocks, final rate 0.5.
    rates = schedules.linear_decay(54, 0.5)
    assert len(rates) == 54 and rates[0] == pytest.approx(0.5 / 54)


def test_uniform():
    assert schedules.uniform(3, 0.2) == (0.2, 0.2, 0.2)
    assert schedules.uniform(0, 0.2) == ()


def test_efficientnet_counts_from_zero():
    rates = schedules.efficientnet(4, 0.2)
    assert rates == pytest.approx((0.0, 0.05, 0.1, 0.15))
    assert rates[0] == 0.0


def test_get_and_registry():
    assert schedules.get("linear") is schedules.linear_decay
    assert schedules.get("uniform") is schedules.uniform
    assert set(schedules.SCHEDULES) >= {"linear", "uniform"}
    with pytest.raises(ValueError, match=r"'cosine'.*linear.*uniform"):
        schedules.get("cosine")


@pytest.mark.parametrize("fn", [schedules.linear_decay, schedules.uniform, schedules.efficientnet])
@pytest.mark.parametrize("num_blocks", [-1, 2.5, True, "3"])
def test_invalid_num_blocks(fn, num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        fn(num_blocks, 0.5)


@pytest.mark.parametrize("fn", [schedules.linear_decay, schedules.uniform, schedules.efficientnet])
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_invalid_rate(fn, rate):
    with pytest.raises(ValueError, match=r"rate.*\[0, 1\]"):
        fn(3, rate)
