"""Fast tests of the fidelity experiments' pure parts: intervals, aggregation, recipe equivalence."""

import argparse

import numpy as np
import pytest

from experiments.common import stats as fidelity_stats
from experiments.reference import compare as fidelity_reference
from experiments.reference import train_torch as reference_torch
from experiments.regime import report as fidelity_regime_report
from experiments.regime import run as fidelity_regime

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
    low, high = fidelity_stats.ci_bounds(two)
    assert low == pytest.approx(0.2 - two["half_width"]) and high == pytest.approx(
        0.2 + two["half_width"]
    )
    assert all(np.isnan(fidelity_stats.ci_bounds(one)))


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
    assert rows["sdjax"]["gap"] is None  # one pair: no interval
    assert rows["torch"]["gap"]["diff"] == pytest.approx(0.02)
    assert rows["torch"]["gap"]["df"] == 1.0  # paired: n - 1
    assert fidelity_reference.gap_difference(list(rows.values())) is None
    runs += [_run("sdjax", "constant", 1, 0.02), _run("sdjax", "sd", 1, 0.02)]
    diff = fidelity_reference.gap_difference(fidelity_reference.gap_rows(runs))
    assert diff["diff"] == pytest.approx(0.005 - 0.02)
    assert diff["low"] < diff["diff"] < diff["high"]


def test_gaps_are_paired_by_seed():
    """Seed effects shared by both variants cancel: a paired interval, not Welch's."""
    from scipy import stats

    const, sd = [0.30, 0.40, 0.50], [0.32, 0.41, 0.53]
    runs = [_run("sdjax", v, seed, e) for v, es in (("constant", const), ("sd", sd))
            for seed, e in enumerate(es)]  # fmt: skip
    gap = fidelity_reference.gap_rows(runs)[0]["gap"]
    d = np.subtract(sd, const)
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert gap["differences"] == pytest.approx(d.tolist())
    assert (gap["diff"], gap["high"] - gap["diff"], gap["df"]) == pytest.approx((d.mean(), half, 2))
    assert half < fidelity_stats.welch_diff_interval(sd, const)["high"] - d.mean()


def _paired_se2_df(sd, constant):
    """Hand computation: the squared standard error and df of the mean per-seed difference."""
    d = np.subtract(sd, constant)
    return np.var(d, ddof=1) / len(d), len(d) - 1


def test_gap_difference_interval_uses_the_satterthwaite_df_of_the_two_gaps():
    """Unequal spreads, 2 and 3 seeds: the paired gaps' dfs are 1 and 2; the df of their
    difference (the frameworks are not paired) is Satterthwaite's, not their sum nor their
    minimum."""
    from scipy import stats

    errors = {"sdjax": {"constant": [0.38, 0.39], "sd": [0.38, 0.23]},
              "torch": {"constant": [0.31, 0.32, 0.25], "sd": [0.27, 0.25, 0.21]}}  # fmt: skip
    runs = [_run(fw, v, seed, e) for fw, by in errors.items() for v, es in by.items()
            for seed, e in enumerate(es)]  # fmt: skip
    diff = fidelity_reference.gap_difference(fidelity_reference.gap_rows(runs))
    (se2_a, df_a), (se2_b, df_b) = (_paired_se2_df(errors[fw]["sd"], errors[fw]["constant"])
                                    for fw in ("sdjax", "torch"))  # fmt: skip
    df = (se2_a + se2_b) ** 2 / (se2_a**2 / df_a + se2_b**2 / df_b)
    assert (df_a, df_b) == (1, 2) and 1 < df < 3
    assert diff["diff"] == pytest.approx((0.305 - 0.385) - (0.73 / 3 - 0.88 / 3))
    assert diff["se"] == pytest.approx((se2_a + se2_b) ** 0.5, rel=1e-9)
    assert diff["df"] == pytest.approx(df, rel=1e-9)
    half = stats.t.ppf(0.975, df) * (se2_a + se2_b) ** 0.5
    assert diff["high"] - diff["diff"] == pytest.approx(half, rel=1e-9)
    assert diff["diff"] - diff["low"] == pytest.approx(half, rel=1e-9)


def _rec(budget, variant, seed, err, loss=None):
    return {"budget": budget, "variant": variant, "seed": seed, "test_error": err,
            "final_train_loss": loss}  # fmt: skip


def test_regime_summary_on_partial_results():
    runs = [
        _rec(30, "constant", 0, 0.3, 0.1),
        _rec(15, "constant", 0, 0.4, 0.5),
        _rec(15, "constant", 1, 0.5, 0.3),
        _rec(15, "sd", 0, 0.45),
        _rec(15, "sd", 1, 0.55, 0.7),
        _rec(15, "warmup0.25", 0, 0.35),
        _rec(30, "sd", 0, 0.2),
    ]
    rows = fidelity_regime_report.summarize(runs)
    assert [(r["budget"], r["variant"]) for r in rows] == [
        (15, "constant"), (15, "sd"), (15, "warmup0.25"), (30, "constant"), (30, "sd"),
    ]  # fmt: skip
    by = {(r["budget"], r["variant"]): r for r in rows}
    assert by[15, "sd"]["gap"]["diff"] == pytest.approx(0.05)
    assert by[15, "constant"]["train_loss"] == pytest.approx(0.4)
    assert by[15, "sd"]["train_loss"] == pytest.approx(0.7)
    assert by[15, "constant"]["gap"] is None  # the baseline has no gap to itself
    assert by[15, "warmup0.25"]["gap"] is None  # one run: no interval
    assert by[30, "sd"]["gap"] is None and by[30, "sd"]["error"]["n"] == 1
    table = fidelity_regime_report.budget_table(rows, 0.5)
    assert "n/a" in table and "over the first 0.25 of the steps" in table


def test_regime_survival_sweep_points_share_constant_and_place_sd_on_the_linear_rule():
    runs = [_rec(80, v, s, e + 0.01 * s) for s in (0, 1) for v, e in [
        ("constant", 0.40), ("sd", 0.45), ("linear0.2", 0.42), ("uniform0.2", 0.43),
        ("uniform0.8", 0.60), ("warmup0.25", 0.44)]]  # fmt: skip
    rows = fidelity_regime_report.summarize(runs)
    assert fidelity_regime_report.sweep_budgets(rows) == [80]
    pts = fidelity_regime_report.sweep_points(rows, 80, rate=0.5)
    assert [p for p, _ in pts["linear"]] == [0.0, 0.2, 0.5]
    assert [p for p, _ in pts["uniform"]] == [0.0, 0.2, 0.8]
    assert pts["uniform"][2][1]["gap"]["diff"] == pytest.approx(0.20)
    table = fidelity_regime_report.sweep_table(rows, 80, rate=0.5)
    assert table.count("\n") == 2 + 4  # header, rule, p_L = 0, 0.2, 0.5, 0.8
    assert "warmup" not in table


def test_regime_variants_parse_to_config_overrides_and_bad_names_are_refused():
    args = argparse.Namespace(depth=20, train_size=1024, rate=0.5, data_dir=None,
                              checkpoint_every_steps=200)  # fmt: skip
    o = fidelity_regime.overrides(args, "warmup0.25", 40, 2)
    assert o["train.drop_warmup_fraction"] == 0.25 and o["model.final_drop_rate"] == 0.5
    assert "train.drop_warmup_fraction" not in fidelity_regime.overrides(args, "sd", 40, 2)
    o = fidelity_regime.overrides(args, "uniform0.8", 40, 2)
    assert (o["model.drop_schedule"], o["model.final_drop_rate"]) == ("uniform", 0.8)
    assert fidelity_regime.overrides(args, "constant", 40, 2)["model.final_drop_rate"] == 0.0
    for bad in ("sd0.3", "warmup", "uniform1.5", "linear0.5", "dropout0.1", "constant0.1"):
        with pytest.raises(ValueError, match=bad):
            fidelity_regime.parse_variant(bad, 0.5)
    with pytest.raises(SystemExit):
        fidelity_regime.parse_args(["--variants", "constant", "uniform0"])


def test_regime_claims_share_runs_between_processes(tmp_path):
    import os
    import subprocess
    import sys

    workdir = tmp_path / "run"
    assert fidelity_regime.claim(workdir) and fidelity_regime.claim(workdir)  # mine, idempotent
    (workdir / "claim.pid").unlink()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / "claim.pid").write_text(str(sleeper.pid))
        assert not fidelity_regime.claim(workdir)  # held by a live process
    finally:
        sleeper.kill()
        sleeper.wait()
    assert fidelity_regime.claim(workdir)  # its process is gone: taken over
    assert (workdir / "claim.pid").read_text() == str(os.getpid())


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
    """2,000 NCHW images of distinct pixels, padding 1: each output is one of the 9 windows of
    its zero-padded image, and the offsets are uniform over the 9 (chi-square)."""
    from scipy import stats

    n = 2000
    images = np.arange(n * 2 * 5 * 6, dtype=np.float32).reshape(n, 2, 5, 6) + 1
    out = reference_torch.random_crop(images, np.random.default_rng(0), 1)
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.stack(
        [padded[..., dy : dy + 5, dx : dx + 6] for dy in range(3) for dx in range(3)]
    )
    match = np.all(windows == out[None], axis=(2, 3, 4))  # [9, n]
    assert np.all(match.sum(0) == 1)  # exactly one window each
    counts = np.bincount(match.argmax(0), minlength=9)
    assert stats.chisquare(counts).pvalue > 1e-3 and counts[4] < 2 * n / 9  # 4: uncropped


def test_torch_peer_eval_scales_branch_and_init_matches_flax_dense(torch):
    from experiments.reference import torch_models

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


def test_same_pad_conv_matches_xla_same_output_size(torch):
    from experiments.reference import torch_models

    conv = torch_models.SamePadConv2d(1, 1, 3, stride=2, padding=0, bias=False)
    for size in (7, 8):
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)


@pytest.mark.parametrize("image_size,channels", [(8, 1), (32, 3)], ids=["digits", "cifar10"])
def test_sdjax_and_torch_reference_agree_step_for_step(image_size, channels, torch):
    from experiments.reference import equivalence as fidelity_equivalence

    diffs = fidelity_equivalence.compare(
        depth=20, num_keys=1, batch=4 if image_size > 8 else 8, gate_draws=2000,
        image_size=image_size, channels=channels,
    )  # fmt: skip
    assert diffs["skipped_blocks_key0"] > 0  # the key skips some blocks: gates are exercised
    assert diffs["eval_logits_scale"] > 0.1  # evaluation output is not trivially zero
    for name, value in diffs.items():
        if not name.startswith(("skipped", "eval_logits_scale", "gate")):
            assert value < 1e-3, (name, value)
    assert diffs["gate_frequency_max_abs_z"] < 5.0


def test_sdjax_optimizer_and_torch_sgd_follow_the_same_trajectory(torch):
    """Several updates from the same weights: sdjax's optimizer (weight decay, Nesterov) and the
    reference's torch SGD give the same losses over the first steps."""
    from experiments.reference import equivalence as fidelity_equivalence

    losses = fidelity_equivalence.trajectory(depth=20, steps=4, batch=16, image_size=8, channels=3)
    assert len({round(v, 3) for v in losses["sdjax"]}) == 4  # the weights change every step
    assert losses["sdjax"] == pytest.approx(losses["torch"], rel=1e-3)


def test_torch_state_conversion_round_trips(torch):
    """`_from_torch_state` (crossed runs start sdjax from the PyTorch weights) inverts
    `_to_torch_state`, and the converted weights give the same evaluation logits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.reference import equivalence, torch_models, train_torch
    from sdjax import models

    torch.manual_seed(0)
    tmodel = torch_models.CifarResNet(20, None, "batch", False, 10, input_channels=3,
                                      same_padding=True)  # fmt: skip
    train_torch.init_like_sdjax(tmodel)
    state = {k: v for k, v in tmodel.state_dict().items() if "num_batches" not in k}
    variables = equivalence._from_torch_state(state, 20)
    back = equivalence._to_torch_state(variables, 20)
    assert set(back) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)
    model = models.create("cifar_resnet20", scan_blocks=True, num_classes=10, final_drop_rate=0.0)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    scanned = jax.tree.map(jnp.asarray, models.unrolled_to_scan(variables))
    logits = np.asarray(model.apply(scanned, x, train=False))
    tmodel.eval()
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The PyTorch reference's CIFAR-10 mode implements configs/cifar10_sd.py's recipe


def _sdjax_config(name: str, arg: str | None = None):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("dataset, config_file", [("cifar10", "cifar10_sd.py"),
                                                  ("digits", "digits_sd.py")])  # fmt: skip
def test_cifar_and_digits_recipes_match_sdjax_configs(dataset, config_file):
    """The reference's recipe (batch sizes, augmentation, warm-up) and the fixed parts of its
    optimizer are those of the sdjax config (no PyTorch needed to compare them). The reference
    follows sdjax's earlier recipe (``recipe=sdjax``); ``paper_torch`` ports the paper's."""
    config = _sdjax_config(config_file, "recipe=sdjax" if dataset == "cifar10" else None)
    recipe = reference_torch.RECIPES[dataset]
    assert recipe.batch_size == config.train.batch_size
    assert recipe.eval_batch_size == config.train.eval_batch_size
    assert recipe.crop_padding == config.input.augment.crop_padding
    assert recipe.flip == config.input.augment.flip
    assert (recipe.warmup_epochs, 0) == (config.optim.warmup_epochs, config.optim.warmup_steps)
    assert (config.input.normalize, config.input.validation_size) == (True, 0)
    o = config.optim
    assert (o.optimizer, o.learning_rate, o.momentum, o.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (o.weight_decay, o.weight_decay_on, o.lr_schedule) == (1e-4, "all", "step")
    assert tuple(o.boundaries) == (0.5, 0.75) and o.decay_factor == 0.1
    assert o.label_smoothing == 0.0 and o.ema_decay == 0.0
    assert (config.train.drop_warmup_fraction, config.train.half_precision) == (0.0, False)
    assert config.model.scale_by_keep is False and config.model.drop_mode == "batch"


@pytest.mark.parametrize("dataset", ["cifar10", "digits"])
def test_torch_batch_norm_matches_flax(dataset, torch):
    """BatchNorm: Flax momentum 0.9 / eps 1e-5 == Torch momentum 0.1 / eps 1e-5."""
    from experiments.reference import torch_models
    from sdjax.models.cifar_resnet import CifarResNet

    recipe = reference_torch.RECIPES[dataset]
    bn = torch_models.CifarResNet(20, input_channels=recipe.input_channels).stem[1]
    flax_model = CifarResNet(depth=20)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert bn.momentum == pytest.approx(1 - flax_model.bn_momentum)
    assert bn.eps == flax_model.bn_epsilon


def test_cifar_steps_and_learning_rate_match_sdjax():
    from sdjax import optim, trainer

    config = _sdjax_config("cifar10_sd.py", "epochs=20,recipe=sdjax")
    recipe = reference_torch.RECIPES["cifar10"]
    spe, total = reference_torch.schedule_lengths(1024, recipe.batch_size, 20)
    assert (spe, total) == (8, 160)  # 1024 // 128, remainder dropped; the regime records' steps
    assert total == trainer._total_steps(config, spe)
    assert reference_torch.schedule_lengths(1000, 128, 3) == (7, 21)  # 1000 % 128 unused
    schedule = optim.learning_rate_schedule(config.optim, total, spe)
    lrs = [reference_torch.learning_rate(s, total, spe, warmup_epochs=recipe.warmup_epochs)
           for s in range(total + 1)]  # fmt: skip
    assert lrs[0] == 0.1 and lrs[79] == 0.1 and lrs[80] == pytest.approx(0.01)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-9), step


def test_cifar_data_and_normalisation_match_sdjax_pipeline(tfds_data_dir):
    from sdjax.data import augment, pipeline

    config = _sdjax_config("cifar10_sd.py", "recipe=sdjax")
    config.input.train_split, config.input.test_split = "train[:256]", "test[:64]"
    config.input.data_dir = str(tfds_data_dir)
    data = pipeline.create(config.input)
    (x_tr, y_tr), (x_te, y_te) = reference_torch.cifar10_split(256, str(tfds_data_dir), "test[:64]")
    assert x_tr.shape == (256, 3, 32, 32) and x_tr.dtype == np.uint8
    np.testing.assert_array_equal(x_tr.transpose(0, 2, 3, 1), data.train[0])
    np.testing.assert_array_equal(y_tr, data.train[1])
    np.testing.assert_array_equal(x_te.transpose(0, 2, 3, 1), data.test[0])
    np.testing.assert_array_equal(y_te, data.test[1])
    mean, std = reference_torch.channel_stats(x_tr)
    np.testing.assert_allclose(mean, data.mean, rtol=1e-12)
    np.testing.assert_allclose(std, data.std, rtol=1e-12)
    ours = reference_torch.normalize(x_tr[:16], mean.astype(np.float32), std.astype(np.float32))
    theirs = np.asarray(augment.normalize(data.train[0][:16], data.mean, data.std))
    np.testing.assert_allclose(ours.transpose(0, 2, 3, 1), theirs, rtol=1e-6, atol=1e-6)
    assert data.steps_per_epoch(128) == reference_torch.schedule_lengths(256, 128, 1)[0] == 2
    # Same example order as sdjax's pipeline for a given seed.
    for step in (0, 1, 2, 5):
        epoch, i = divmod(step, 2)
        order = np.random.default_rng([3, epoch]).permutation(256)
        np.testing.assert_array_equal(
            order[i * 128 : (i + 1) * 128], pipeline.batch_indices(3, step, 128, 256)
        )


def test_cifar_random_flip_mirrors_about_half_of_the_images():
    """40,000 images: each is itself or its mirror, the mirrored fraction within 5 standard
    errors (0.0125) of 1/2."""
    n = 40_000
    images = np.random.default_rng(0).normal(size=(n, 3, 1, 2)).astype(np.float32)
    out = reference_torch.random_flip(images, np.random.default_rng(1))
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[..., ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert abs(mirrored.mean() - 0.5) < 5 * (0.25 / n) ** 0.5


def test_cifar_one_step_run_writes_result(tfds_data_dir, tmp_path, torch):
    argv = ["--dataset=cifar10", "--train_size=128", "--test_split=test[:50]",
            f"--data_dir={tfds_data_dir}", "--variant=sd", "--seed=0", "--depth=8",
            "--epochs=1", f"--out={tmp_path}"]  # fmt: skip
    result = reference_torch.main(argv)
    import json

    saved = json.loads((tmp_path / "sd_seed0.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["dataset"] == "cifar10" and saved["train_split"] == "train[:128]"
    assert (saved["steps"], saved["steps_per_epoch"], saved["batch_size"]) == (1, 1, 128)
    assert (saved["train_size"], saved["test_size"]) == (128, 50)
    assert 0.0 <= saved["test_error"] <= 1.0 and np.isfinite(saved["final_train_loss"])
    assert len(saved["train_loss_per_epoch"]) == len(saved["epoch_time_s"]) == 1
    assert len(saved["normalization_mean"]) == len(saved["normalization_std"]) == 3
    assert saved["final_drop_rate"] == 0.5 and 0.0 < saved["kept_block_fraction"] <= 1.0
    with pytest.raises(SystemExit):  # digits keeps its fixed split
        reference_torch.main(["--variant=sd", "--seed=0", "--train_size=5", f"--out={tmp_path}"])


def test_cifar_mode_reuses_regime_records_and_reports_gaps(tmp_path):
    import json

    args = argparse.Namespace(depth=20, train_size=1024, epochs=20, data_dir="/elsewhere/tfds",
                              sdjax_records=None)  # fmt: skip
    record_path = fidelity_reference.sdjax_record_path(args, "sd", 0)
    record = json.loads(record_path.read_text())
    planned = fidelity_reference.sdjax_cifar_command(args, "sd", 0, tmp_path / "w")
    assert fidelity_reference.same_sdjax_run(record["command"], planned)  # workdir, data dir
    other = fidelity_reference.sdjax_cifar_command(args, "sd", 1, tmp_path / "w")
    assert not fidelity_reference.same_sdjax_run(record["command"], other)
    args.epochs = 40
    longer = fidelity_reference.sdjax_cifar_command(args, "sd", 0, tmp_path / "w")
    assert not fidelity_reference.same_sdjax_run(record["command"], longer)

    out = tmp_path / "out"
    torch_dir = out / "torch_runs"  # committed records beside the results
    torch_dir.mkdir(parents=True)
    for seed, (c, s) in enumerate([(0.55, 0.60), (0.57, 0.64)]):
        for variant, err in (("constant", c), ("sd", s)):
            run = {"framework": "torch", "variant": variant, "seed": seed, "test_error": err,
                   "final_train_loss": 1.0, "train_time_s": 10.0}  # fmt: skip
            (torch_dir / f"{variant}_seed{seed}.json").write_text(json.dumps(run))
    argv = ["--dataset=cifar10", "--depth=20", "--train_size=1024", "--epochs=20", "--seeds=2",
            "--aggregate_only", f"--workdir_root={tmp_path / 'root'}", f"--out={out}"]  # fmt: skip
    results = fidelity_reference.main(argv)
    assert (out / "results.json").exists() and "CIFAR-10" in (out / "results.md").read_text()
    assert results["pending"] == []
    sdjax = [r for r in results["runs"] if r["framework"] == "sdjax"]
    assert len(sdjax) == 4 and all(r["reused"] for r in sdjax)
    regime = fidelity_regime.RESULTS_DIR / "runs" / "resnet20_n1024_rate0.5" / "ep20"
    for r in sdjax:
        expected = json.loads((regime / f"{r['variant']}_seed{r['seed']}.json").read_text())
        assert r["test_error"] == expected["test_error"]
    rows = {r["framework"]: r for r in results["gaps"]}
    assert rows["torch"]["gap"]["diff"] == pytest.approx(0.06)
    assert results["gap_difference_sdjax_minus_torch"] is not None
    # Without torch runs: the sdjax side still aggregates, the torch runs are listed as pending.
    results = fidelity_reference.main([*argv[:-2], f"--workdir_root={tmp_path / 'none'}",
                                       f"--out={tmp_path / 'out2'}"])  # fmt: skip
    assert {(p["framework"], p["variant"], p["seed"]) for p in results["pending"]} == {
        ("torch", v, s) for v in ("constant", "sd") for s in (0, 1)
    }


def test_regime_plans_the_sdjax_recipe_and_reuses_every_committed_record(tmp_path):
    """The runner plans `configs/cifar10_sd.py:recipe=sdjax`; the committed records (made with
    `--config=configs/cifar10_sd.py` before the default became the paper's recipe) still match,
    so `--aggregate_only` reports none missing, and the gaps are paired (n - 1 df)."""
    import shutil

    argv = ["--aggregate_only", "--depth", "20", "--train_size", "1024", "--budgets", "20", "40",
            "80", "160", "--seeds", "3", "--data_dir", "/work/shared/data/tfds", "--variants",
            "constant", "sd", "warmup0.25", "--workdir_root", str(tmp_path / "w"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    records = fidelity_regime.RESULTS_DIR / "runs"
    shutil.copytree(records, tmp_path / "out" / "runs")  # --out holds the records it reads
    args = fidelity_regime.parse_args(argv)
    planned = fidelity_regime.planned_command(args, tmp_path, 160, 0, "sd")
    assert "--config=configs/cifar10_sd.py:recipe=sdjax" in planned
    results = fidelity_regime.main(argv)
    assert results["pending"] == []
    assert len(results["runs"]) == len(list(records.glob("resnet20_n1024_rate0.5/ep*/*.json")))
    by = {(r["budget"], r["variant"]): r["gap"] for r in results["summary"]}
    assert by[160, "sd"]["df"] == 2.0 and len(by[160, "sd"]["differences"]) == 3
    assert (100 * by[160, "sd"]["low"], 100 * by[160, "sd"]["high"]) == pytest.approx(
        (-2.87, 2.22), abs=0.005
    )
    assert by[20, "sd"]["n"] == 6


def test_digits_mode_regenerates_from_the_committed_runs(tmp_path):
    """Without workdirs, `--aggregate_only` reads the runs of the committed results.json and
    keeps the provenance of the call that recorded them."""
    import json
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(fidelity_reference.RESULTS_DIR / "results.json", out / "results.json")
    saved = json.loads((out / "results.json").read_text())
    argv = ["--depth=32", "--epochs=15", "--seeds=10", "--aggregate_only",
            f"--workdir_root={tmp_path / 'none'}", f"--out={out}"]  # fmt: skip
    results = fidelity_reference.main(argv)
    assert len(results["runs"]) == len(saved["runs"]) == 40
    assert results["runs_provenance"] == saved.get("runs_provenance", saved["provenance"])
    assert all(r["gap"]["n"] == 10 and r["gap"]["df"] == 9 for r in results["gaps"])
    md = (out / "results.md").read_text()
    assert "paired analysis" in md and "Sensitivity" not in md
