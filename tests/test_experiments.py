"""Fast tests of the experiment scripts' pure parts (aggregation, tables, commands); no training."""

import argparse
import json
import math
import shlex

import pytest

from experiments import cifar10_short, common, digits_curves, digits_depth, survival_sweep


def test_mean_std():
    assert common.mean_std([1.0]) == (1.0, 0.0)
    mean, std = common.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(std, 1.0)
    with pytest.raises(ValueError, match="empty"):
        common.mean_std([])
    assert common.format_mean_std([0.05, 0.07], scale=100) == "6.00 ± 1.41"


def test_markdown_table():
    table = common.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    with pytest.raises(ValueError, match="expected 2"):
        common.markdown_table(["a", "b"], [[1]])


def test_provenance_has_command_versions_machine():
    prov = common.provenance()
    assert prov["command"].startswith("python")
    assert "python" in prov["versions"] and prov["machine"]["cpu_count"] >= 1
    text = common.provenance_markdown(prov)
    assert "Command:" in text and "Machine:" in text


def test_train_command_and_reuse(tmp_path):
    cmd = common.train_command(
        "configs/digits_sd.py", tmp_path / "w", {"seed": 1, "optim.boundaries": (0.5, 0.75)}
    )
    assert cmd[:3] == ["python", "-m", "sdjax.main"]
    assert f"--workdir={tmp_path / 'w'}" in cmd
    assert "--config.seed=1" in cmd and "--config.optim.boundaries=(0.5,0.75)" in cmd
    # A finished run (results.json present) is read back, not rerun.
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "results.json").write_text(json.dumps({"test_error": 0.1}))
    result = common.run_training(cmd, tmp_path / "w")
    assert result == {"test_error": 0.1, "command": shlex.join(cmd), "reused": True}


def test_epoch_curves_weights_train_loss_and_dedups(tmp_path):
    records = [
        {"step": 5, "train_loss": 2.0},
        {"step": 10, "train_loss": 1.0},  # epoch 1 = steps 1..10: (5*2 + 5*1) / 10
        {"step": 10, "epoch_time_s": 30.0},
        {"step": 10, "epoch": 1.0, "test_accuracy": 0.5, "test_loss": 1.5},
        {"step": 20, "train_loss": 0.5},
        {"step": 20, "epoch_time_s": 3.0},
        {"step": 20, "epoch": 2.0, "test_accuracy": 0.7, "test_loss": 1.0},
        {"step": 20, "epoch": 2.0, "test_accuracy": 0.8, "test_loss": 0.9},  # resumed: last wins
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    curves = common.epoch_curves(common.read_jsonl(path))
    assert curves["epoch"] == [1.0, 2.0]
    assert [round(e, 6) for e in curves["test_error"]] == [0.5, 0.2]
    assert curves["train_epoch"] == [1.0, 2.0]
    assert curves["train_loss"] == [1.5, 0.5]
    assert curves["epoch_time_s"] == [30.0, 3.0]
    assert common.steady_epoch_time(curves["epoch_time_s"]) == 3.0
    assert common.steady_epoch_time([10.0]) == 10.0
    assert common.steady_epoch_time([]) is None
    assert common.epoch_curves([{"step": 1, "train_loss": 1.0}])["epoch"] == []


def _run(variant, seed, err, time_s, epoch_s):
    curves = {
        "epoch": [1.0, 2.0],
        "test_error": [err + 0.1, err],
        "train_epoch": [1.0, 2.0],
        "train_loss": [1.0, 0.5],
        "epoch_time_s": [10.0, epoch_s],
    }
    return {
        "variant": variant,
        "seed": seed,
        "test_error": err,
        "test_accuracy": 1 - err,
        "train_time_s": time_s,
        "epoch_time_s": epoch_s,
        "curves": curves,
    }


RUNS = [
    _run("constant", 0, 0.04, 100.0, 4.0),
    _run("constant", 1, 0.06, 100.0, 4.0),
    _run("linear", 0, 0.03, 80.0, 3.0),
    _run("linear", 1, 0.03, 80.0, 3.0),
]


def test_digits_depth_aggregate_and_table():
    rows = digits_depth.aggregate(RUNS)
    assert [r["variant"] for r in rows] == ["constant", "linear"]
    assert math.isclose(rows[0]["test_error"][0], 0.05)
    assert math.isclose(rows[1]["time_vs_constant"], 0.8)
    assert math.isclose(rows[1]["epoch_time_vs_constant"], 0.75)
    table = digits_depth.results_table(rows, {"constant": 54.0, "linear": 40.25}, 54)
    assert "| linear | 40.2 / 54 | 2 | 3.00 ± 0.00 |" in table
    assert digits_depth.variant_overrides("constant", 0.5) == {"model.final_drop_rate": 0.0}
    assert digits_depth.variant_overrides("uniform", 0.5)["model.drop_schedule"] == "uniform"
    with pytest.raises(ValueError, match="variant"):
        digits_depth.variant_overrides("bogus", 0.5)
    assert digits_depth.expected_depth("linear", 0.5, 54) == pytest.approx(40.25)
    assert digits_depth.expected_depth("uniform", 0.5, 54) == pytest.approx(27.0)


def test_digits_curves_mean_curves():
    curves = digits_curves.mean_curves(RUNS)
    assert curves["constant"]["test_error_mean"] == pytest.approx([0.15, 0.05])
    assert curves["linear"]["train_loss_mean"] == [1.0, 0.5]
    assert "| constant | 2 | 5.00 ± 1.41 |" in digits_curves.results_table(curves)


def test_cifar10_short_summary():
    rows = cifar10_short.summarize(
        [
            {**RUNS[0], "variant": "constant"},
            {**RUNS[2], "variant": "stochastic depth"},
        ]
    )
    assert math.isclose(rows[1]["time_saved"], 0.25)
    assert math.isclose(rows[1]["total_time_saved"], 0.2)
    table = cifar10_short.results_table(rows)
    assert "25.0%" in table and "6.41" in table and "5.25" in table


def test_survival_sweep_commands_and_curves(tmp_path):
    args = argparse.Namespace(
        seeds=2, depth=56, epochs=15, rates=[0.0, 0.5, 0.9], rules=["linear", "uniform"]
    )
    argvs = survival_sweep.sweep_argvs(args, "/tmp/s")
    assert len(argvs) == 2
    assert "--grid=model.final_drop_rate=0.0" in argvs[0]
    assert "--grid=model.final_drop_rate=0.5,0.9" in argvs[1]
    assert "--grid=model.drop_schedule=linear,uniform" in argvs[1]
    assert "--config.model.name=cifar_resnet56" in argvs[0]

    for name, rate, rule, err in [
        ("a", 0.0, "linear", 0.05),
        ("b", 0.5, "linear", 0.03),
        ("c", 0.5, "uniform", 0.04),
    ]:
        (tmp_path / name).mkdir()
        result = {
            "test_error": err,
            "train_time_s": 10.0,
            "config": {"seed": 0, "model": {"final_drop_rate": rate, "drop_schedule": rule}},
        }
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    curve = survival_sweep.curves(survival_sweep.collect(tmp_path))
    # The constant-depth run (rate 0) is shared by both rules.
    assert curve["linear"]["final_drop_rate"] == [0.0, 0.5]
    assert curve["uniform"]["final_drop_rate"] == [0.0, 0.5]
    assert curve["uniform"]["test_error"][1] == (0.04, 0.0)
    table = survival_sweep.results_table(curve)
    assert "| 0.5 | 0.5 | 3.00 ± 0.00 (n=1) | 10 | 4.00 ± 0.00 (n=1) | 10 |" in table


def test_dropout_mlp_data_and_summary():
    import numpy as np

    from experiments import dropout_mlp

    a = dropout_mlp.make_data(8, 20, 0.3, seed=0)
    b = dropout_mlp.make_data(8, 20, 0.3, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["x_train"].shape == (8, 1) and a["y_test"].dtype == np.float32
    curves = {
        0.0: [{"train_mse": np.array([0.5, 0.1]), "test_mse": np.array([0.3, 0.4])}],
        0.5: [{"train_mse": np.array([0.6, 0.2]), "test_mse": np.array([0.5, 0.2])}],
    }
    rows = dropout_mlp.summarize(curves, eval_every=10)
    assert rows[0]["final_test_mse"] == (0.4, 0.0)
    assert rows[0]["best_test_mse"] == (0.3, 0.0) and rows[0]["best_test_step_median"] == 10
    assert rows[1]["best_test_step_median"] == 20


def test_conv_microbench_flops_and_smoke_run(tmp_path):
    """The FLOP count is the textbook one; a tiny run writes rows for both implementations in
    both contexts, and (when PyTorch is installed) a top-level-only PyTorch peer column."""
    from experiments import conv_microbench  # noqa: PLC0415

    fwd = conv_microbench._flops((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, "fwd")
    assert fwd == 2 * 128 * 16 * 16 * 32 * 9 * 16
    assert conv_microbench._flops((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, "fwd+bwd") == 3 * fwd
    depthwise = conv_microbench._flops((8, 16, 16, 96), (3, 3, 1, 96), 1, 96, "fwd")
    assert depthwise == 2 * 8 * 16 * 16 * 96 * 9

    conv_microbench.main(
        ["--quick", "--batch", "4", "--cases", "64->64", "--out_dir", str(tmp_path)]
    )
    result = json.loads((tmp_path / "conv_microbench.json").read_text())
    keys = {(r["context"], r["pass_"], r["impl"]) for r in result["rows"]}
    for context in ("top", "cond"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert {(context, pass_, "xla"), (context, pass_, "fast")} <= keys
    torch_keys = {k for k in keys if k[2] == "torch"}
    markdown = (tmp_path / "conv_microbench.md").read_text()
    assert "| fast GFLOP/s | PyTorch ms | fast / PyTorch |" in markdown
    if conv_microbench.torch is not None:
        assert torch_keys == {("top", "fwd", "torch"), ("top", "fwd+bwd", "torch")}
    else:
        assert not torch_keys and "PyTorch: not run" in markdown
