"""Fast tests of the fidelity experiments' pure parts: intervals, aggregation, recipe equivalence."""

import argparse

import numpy as np
import pytest

from experiments import fidelity_reference, fidelity_regime, fidelity_stats, reference_torch

# ---------------------------------------------------------------------------------------------
# Intervals


def test_welch_interval_matches_scipy_ttest():
    from scipy import stats

    a = [0.021, 0.017, 0.030, 0.019, 0.025, 0.028]
    b = [0.011, 0.014, 0.008, 0.017, 0.012]
    got = fidelity_stats.welch_diff_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert got["low"] == pytest.approx(ci.low)
    assert got["high"] == pytest.approx(ci.high)


def test_welch_interval_zero_variance_is_a_point():
    got = fidelity_stats.welch_diff_interval([0.02, 0.02], [0.01, 0.01, 0.01])
    assert got["low"] == got["high"] == pytest.approx(0.01)


def test_welch_interval_rejects_small_samples_and_bad_confidence():
    with pytest.raises(ValueError, match=">= 2 values"):
        fidelity_stats.welch_diff_interval([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="confidence"):
        fidelity_stats.welch_diff_interval([0.1, 0.2], [0.1, 0.2], confidence=1.0)


def test_bootstrap_interval_is_deterministic_and_brackets_the_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 20), rng.normal(0.0, 0.1, 20)
    first = fidelity_stats.bootstrap_diff_interval(a, b, seed=3)
    assert first == fidelity_stats.bootstrap_diff_interval(a, b, seed=3)
    assert first["low"] < first["diff"] < first["high"]
    assert 0.8 < first["low"] and first["high"] < 1.2


def test_mean_ci_single_value_has_nan_spread():
    one = fidelity_stats.mean_ci([0.3])
    assert one["mean"] == 0.3 and np.isnan(one["half_width"])
    two = fidelity_stats.mean_ci([0.1, 0.3])
    assert two["half_width"] == pytest.approx(12.706204736 * np.std([0.1, 0.3], ddof=1) / 2**0.5)


# ---------------------------------------------------------------------------------------------
# Aggregation (works on partial results)


def _run(fw, variant, seed, err):
    return {"framework": fw, "variant": variant, "seed": seed, "test_error": err}


def test_gap_rows_partial_and_complete():
    runs = [
        _run("sdjax", "constant", 0, 0.01),
        _run("sdjax", "sd", 0, 0.02),
        _run("torch", "constant", 0, 0.01),
        _run("torch", "constant", 1, 0.02),
        _run("torch", "sd", 0, 0.03),
        _run("torch", "sd", 1, 0.04),
    ]
    rows = {r["framework"]: r for r in fidelity_reference.gap_rows(runs)}
    assert rows["sdjax"]["gap_welch"] is None  # one run per variant: no interval
    assert rows["torch"]["gap_welch"]["diff"] == pytest.approx(0.02)
    assert fidelity_reference.gap_difference(list(rows.values())) is None
    runs += [_run("sdjax", "constant", 1, 0.02), _run("sdjax", "sd", 1, 0.02)]
    rows = fidelity_reference.gap_rows(runs)
    diff = fidelity_reference.gap_difference(rows)
    assert diff["diff"] == pytest.approx(0.005 - 0.02)
    assert diff["low"] < diff["diff"] < diff["high"]


def test_regime_summary_on_partial_results():
    runs = [
        {
            "budget": 30,
            "variant": "constant",
            "seed": 0,
            "test_error": 0.3,
            "final_train_loss": 0.1,
        },
        {
            "budget": 15,
            "variant": "constant",
            "seed": 0,
            "test_error": 0.4,
            "final_train_loss": 0.5,
        },
        {
            "budget": 15,
            "variant": "constant",
            "seed": 1,
            "test_error": 0.5,
            "final_train_loss": 0.3,
        },
        {"budget": 15, "variant": "sd", "seed": 0, "test_error": 0.45, "final_train_loss": None},
        {"budget": 15, "variant": "sd", "seed": 1, "test_error": 0.55, "final_train_loss": 0.7},
    ]
    rows = fidelity_regime.summarize(runs)
    assert [r["budget"] for r in rows] == [15, 30]
    assert rows[0]["gap_welch"]["diff"] == pytest.approx(0.05)
    assert rows[0]["constant_train_loss"] == pytest.approx(0.4)
    assert rows[0]["sd_train_loss"] == pytest.approx(0.7)
    assert rows[1]["sd"] is None and rows[1]["gap_welch"] is None
    assert "n/a" in fidelity_regime.table(rows)


def test_regime_plan_is_budget_major_and_overrides_set_the_subset():
    args = argparse.Namespace(
        depth=56, train_size=5000, budgets=[15, 30], seeds=2, rate=0.5,
        variants=["constant", "sd"], data_dir="/d", checkpoint_every_steps=200,
    )  # fmt: skip
    order = fidelity_regime.plan(args)
    assert order[:4] == [(15, 0, "constant"), (15, 0, "sd"), (15, 1, "constant"), (15, 1, "sd")]
    assert len(order) == 8
    o = fidelity_regime.overrides(args, "sd", 30, 1)
    assert o["input.train_split"] == "train[:5000]"
    assert o["model.final_drop_rate"] == 0.5 and o["train.num_epochs"] == 30
    assert fidelity_regime.overrides(args, "constant", 30, 1)["model.final_drop_rate"] == 0.0
    mine = []
    for k in range(3):
        args.shard = (k, 3)
        mine.append({e for i, e in enumerate(order) if fidelity_regime.in_shard(args, i)})
    assert set().union(*mine) == set(order) and sum(map(len, mine)) == len(order)
    assert all({(b, s) for b, s, _ in m} == {(b, s) for b, s, v in m if v == "sd"} for m in mine)


# ---------------------------------------------------------------------------------------------
# The PyTorch reference implements the same recipe as sdjax


def _sdjax_digits_config():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_sd.py"
    spec = importlib.util.spec_from_file_location("digits_sd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_learning_rate_matches_sdjax_schedule():
    from sdjax import optim

    config = _sdjax_digits_config()
    steps_per_epoch, total = 1437 // 64, 15 * (1437 // 64)
    schedule = optim.learning_rate_schedule(config.optim, total, steps_per_epoch)
    for step in range(total + 1):
        assert reference_torch.learning_rate(step, total, steps_per_epoch) == pytest.approx(
            float(schedule(step)), rel=1e-6, abs=1e-9
        ), step


def test_linear_rates_match_sdjax():
    from sdjax import schedules

    for blocks in (15, 27):
        assert reference_torch.linear_rates(blocks, 0.5) == pytest.approx(
            list(schedules.get("linear")(blocks, 0.5))
        )


def test_digits_data_split_order_and_normalisation_match_sdjax():
    from sdjax.data import pipeline

    config = _sdjax_digits_config()
    data = pipeline.create(config.input)
    (x_tr, y_tr), (x_te, y_te) = reference_torch.digits_split()
    np.testing.assert_array_equal(x_tr[:, 0], data.train[0][..., 0])
    np.testing.assert_array_equal(y_tr, data.train[1])
    np.testing.assert_array_equal(y_te, data.test[1])
    np.testing.assert_allclose([x_tr.mean()], data.mean, rtol=1e-6)
    np.testing.assert_allclose([x_tr.astype(np.float64).std()], data.std, rtol=1e-6)
    n, batch = len(y_tr), 64
    for step in (0, 21, 22, 100):
        epoch, i = divmod(step, n // batch)
        order = np.random.default_rng([5, epoch]).permutation(n)
        np.testing.assert_array_equal(
            order[i * batch : (i + 1) * batch], pipeline.batch_indices(5, step, batch, n)
        )


def test_random_crop_pads_with_zeros_and_keeps_shape():
    images = np.ones((50, 1, 8, 8), np.float32)
    out = reference_torch.random_crop(images, np.random.default_rng(0), 1)
    assert out.shape == images.shape
    # A shifted crop exposes one zero row or column; offset (1, 1) keeps the image.
    zeros = (out == 0).reshape(50, -1).sum(1)
    assert set(zeros.tolist()) <= {0, 8, 15}
    assert zeros.max() > 0


def test_torch_peer_eval_scales_branch_and_init_matches_flax_dense():
    torch = pytest.importorskip("torch")
    from experiments import torch_models

    torch.manual_seed(0)
    model = torch_models.CifarResNet(20, [0.5] * 9, input_channels=1)
    reference_torch.init_like_sdjax(model)
    fc = model.fc.weight.detach().numpy()
    assert np.all(model.fc.bias.detach().numpy() == 0)
    assert abs(fc).max() <= 2 * (1 / 64) ** 0.5 / 0.87962566103423978 + 1e-6
    block = model.blocks[1].residual
    block.eval()
    x = torch.randn(2, 16, 4, 4)
    expected = x + 0.5 * block.branch(x)
    torch.testing.assert_close(block(x, x), expected)


def test_same_pad_conv_matches_xla_same_output_size():
    torch = pytest.importorskip("torch")
    from experiments import torch_models

    conv = torch_models.SamePadConv2d(1, 1, 3, stride=2, padding=0, bias=False)
    for size in (7, 8):
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)


def test_sdjax_and_torch_reference_agree_step_for_step():
    pytest.importorskip("torch")
    from experiments import fidelity_equivalence

    diffs = fidelity_equivalence.compare(depth=20, num_keys=1, batch=8, gate_draws=2000)
    assert diffs["skipped_blocks_key0"] > 0  # the key skips some blocks: gates are exercised
    assert diffs["eval_logits_scale"] > 0.1  # evaluation output is not trivially zero
    for name, value in diffs.items():
        if not name.startswith(("skipped", "eval_logits_scale", "gate")):
            assert value < 1e-3, (name, value)
    assert diffs["gate_frequency_max_abs_z"] < 5.0
