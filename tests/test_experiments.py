"""Fast tests of the experiment scripts' pure parts (aggregation, tables, commands); no training."""

import argparse
import functools
import json
import math
import shlex

import jax
import numpy as np
import pytest

from experiments import common
from experiments.benchmark import library_vs_trainer as library_path
from experiments.cifar10_short import run as cifar10_short
from experiments.convolutions import conv_formulations
from experiments.digits_curves import run as digits_curves
from experiments.digits_depth import run as digits_depth
from experiments.regime import survival_sweep
from sdjax import conv


def _body(table: str) -> list[list[str]]:
    """The body cells of a markdown table (`common.markdown_table`'s layout)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


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


def test_cpu_isa_from_flags():
    assert common.cpu_isa(["fpu", "avx", "avx2", "fma"]) == ["AVX2"]
    assert common.cpu_isa(["avx512f", "amx_tile", "avx2", "avx512bw"]) == ["AVX2", "AVX-512", "AMX"]
    assert common.cpu_isa(["sse4_2", "avx"]) == []
    assert common.isa_text(["AVX2", "AVX-512"]) == "AVX2, AVX-512"


def test_provenance_records_command_versions_machine():
    prov = common.provenance()
    assert prov["command"].startswith("python")
    assert "python" in prov["versions"] and prov["machine"]["cpu_count"] >= 1
    assert prov["machine"]["cpu_isa"] == common.cpu_isa()
    text = common.provenance_markdown(prov)
    for value in (prov["command"], prov["git_commit"], prov["machine"]["cpu"]):
        assert value in text
    assert common.isa_text(prov["machine"]["cpu_isa"]) in text


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
    body = _body(table)
    assert [r[0] for r in body] == ["constant", "linear"]
    assert body[1][1:4] == ["40.2 / 54", "2", common.format_mean_std([0.03, 0.03], scale=100)]
    # Paired gap to constant: per-seed differences -0.01 and -0.03, t interval on 1 df.
    assert rows[1]["gap"]["differences"] == pytest.approx([-0.01, -0.03])
    assert rows[1]["gap"]["df"] == 1.0 and rows[0]["gap"] is None
    assert body[0][-1] == "—" and body[1][-1].startswith("-2.00 [")
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
    body = _body(digits_curves.results_table(curves, digits_curves.final_gaps(RUNS)))
    assert body[1][-1].startswith("-2.00 [") and body[0][-1] == "—"
    assert [r[:3] for r in body] == [
        ["constant", "2", common.format_mean_std([0.04, 0.06], scale=100)],
        ["linear", "2", common.format_mean_std([0.03, 0.03], scale=100)],
    ]


def test_digits_depth_regenerates_from_the_committed_runs(tmp_path):
    """`--aggregate_only` finds every committed run by its command and trains nothing."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(digits_depth.RESULTS_DIR / "results.json", out / "results.json")
    results = digits_depth.main(["--depth=32", "--epochs=15", "--seeds=5", "--aggregate_only",
                                 f"--workdir_root={tmp_path / 'none'}", f"--out={out}"])  # fmt: skip
    assert results["missing"] == [] and len(results["runs"]) == 15
    assert "runs_provenance" in results
    assert "paired analysis" in (out / "results.md").read_text()


def test_cifar10_short_summary():
    rows = cifar10_short.summarize(
        [
            {**RUNS[0], "variant": "constant"},
            {**RUNS[2], "variant": "stochastic depth"},
        ]
    )
    assert math.isclose(rows[1]["time_saved"], 0.25)
    assert math.isclose(rows[1]["total_time_saved"], 0.2)
    assert rows[0]["time_saved"] == 0.0 and rows[1]["epoch_time_s"] == 3.0
    # One line per variant with its measured error and time saved (the paper's column aside).
    body = _body(cifar10_short.results_table(rows))
    assert [(r[0], r[1], r[3], r[6]) for r in body] == [
        ("constant", "1", "4.00", "0.0%"),
        ("stochastic depth", "1", "3.00", "25.0%"),
    ]
    # Total time saved beside the steady state; the error gap is paired (one seed: no interval).
    assert [r[7] for r in body] == ["0.0%", "20.0%"]
    assert body[1][8] == "-1.00 (n=1: no interval)"


def test_cifar10_short_reuses_the_committed_runs_of_the_former_config_default():
    """The runner plans `configs/cifar10_sd.py:recipe=sdjax`; the committed runs (made with
    `--config=configs/cifar10_sd.py` before it defaulted to the paper's recipe) still match."""
    import json

    saved = json.loads((cifar10_short.RESULTS_DIR / "results.json").read_text())
    args = cifar10_short.parse_args(["--depth=20", "--epochs=12", "--cpu_devices=2",
                                     "--data_dir=/work/shared/data/tfds"])  # fmt: skip
    base = cifar10_short.base_overrides(args)
    for variant, overrides in cifar10_short.variants(0.5).items():
        planned = common.train_command(
            cifar10_short.CONFIG, "/elsewhere", {**base, **overrides, "seed": 0}
        )
        assert "--config=configs/cifar10_sd.py:recipe=sdjax" in planned
        run = cifar10_short.committed_run(saved["runs"], variant, 0, planned)
        assert run is not None
        assert run["epoch_time_s"] == common.steady_epoch_time(run["curves"]["epoch_time_s"])
    assert cifar10_short.committed_run(saved["runs"], "constant", 1, planned) is None


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
    body = _body(survival_sweep.results_table(curve))
    assert [r[0] for r in body] == ["0", "0.5"]
    assert body[1][2:] == ["3.00 ± 0.00 (n=1)", "10", "4.00 ± 0.00 (n=1)", "10"]


def test_dropout_mlp_data_and_summary():
    import numpy as np

    from experiments.dropout_mlp import run as dropout_mlp

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
    both contexts, a top-level-only PyTorch peer when PyTorch is installed, one markdown line per
    (case, context, pass), and the machine's CPU and ISA."""
    from experiments.convolutions import conv_microbench  # noqa: PLC0415

    fwd = conv_microbench._flops((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, "fwd")
    assert fwd == 2 * 128 * 16 * 16 * 32 * 9 * 16
    assert conv_microbench._flops((128, 32, 32, 16), (3, 3, 16, 32), 2, 1, "fwd+bwd") == 3 * fwd
    depthwise = conv_microbench._flops((8, 16, 16, 96), (3, 3, 1, 96), 1, 96, "fwd")
    assert depthwise == 2 * 8 * 16 * 16 * 96 * 9

    argv = ["--quick", "--batch", "4", "--cases", "64->64", "--out_dir", str(tmp_path)]
    conv_microbench.main(argv)
    result = json.loads((tmp_path / "conv_microbench.json").read_text())
    assert result["command"] == shlex.join(
        ["python", "-m", "experiments.convolutions.conv_microbench", *argv]
    )
    assert result["cpu_isa"] == common.cpu_isa() == result["provenance"]["machine"]["cpu_isa"]
    keys = {(r["context"], r["pass_"], r["impl"]) for r in result["rows"]}
    for context in ("top", "cond"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert {(context, pass_, "xla"), (context, pass_, "fast")} <= keys
    torch_keys = {k for k in keys if k[2] == "torch"}
    if conv_microbench.torch is not None:
        assert torch_keys == {("top", "fwd", "torch"), ("top", "fwd+bwd", "torch")}
    else:
        assert not torch_keys
    body = _body((tmp_path / "conv_microbench.md").read_text())
    assert sorted((r[1], r[2]) for r in body) == sorted(
        (c, p) for c in ("top", "cond") for p in ("fwd", "fwd+bwd")
    )
    assert all(r[0] == "cifar 3x3 64->64 8x8 s1" for r in body)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_conv_formulations_match_the_package(pass_):
    """Every formulation `conv_microbench --explore` times has the package's values and
    gradients (stride 2, odd size: SAME padding with an extra high row and column)."""
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 7, 7, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 4)) * 0.3
    cotangent = jax.random.normal(kg, (2, 4, 4, 4))

    def values_and_grads(fn):
        out, vjp = jax.vjp(fn, x, kernel)
        return out, vjp(cotangent)

    expected = jax.jit(
        lambda: values_and_grads(functools.partial(conv.conv2d, strides=2, impl="xla"))
    )()
    formulations = conv_formulations.formulations(pass_)
    assert formulations[0] == conv_formulations.PACKAGE and len(set(formulations)) == len(
        formulations
    )
    for formulation in formulations:
        fn = functools.partial(conv_formulations.conv2d, strides=2, formulation=formulation)
        actual = jax.jit(lambda fn=fn: values_and_grads(fn))()
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5, err_msg=str(formulation))
    with pytest.raises(ValueError, match="'winograd'"):
        conv_formulations.conv2d(x, kernel, formulation=("winograd", "conv", "conv"))


def test_library_path_times_both_steps_side_by_side(tmp_path):
    result = library_path.main(
        [
            "--model",
            "cifar_resnet20",
            "--batch_size",
            "4",
            "--image_size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out_dir",
            str(tmp_path),
        ]
    )
    assert {k: len(v) for k, v in result["times_ms"].items()} == {"library": 2, "trainer": 2}
    median = result["median_ms"]
    assert result["library_over_trainer"] == median["library"] / median["trainer"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["library_over_trainer"] == result["library_over_trainer"]


def test_pruning_gaps_are_paired_by_seed():
    from experiments.pruning import run as pruning  # noqa: PLC0415

    def run(arm, seed, error_at_2):
        errors = {"0": 1.0, "2": error_at_2}
        return {"variant": arm, "seed": seed, "errors": {o: errors for o in pruning.ORDERS}}

    runs = [run("constant", 0, 10.0), run("sd", 0, 4.0), run("constant", 1, 30.0)]
    runs += [run("sd", 1, 22.0), run("constant", 2, 20.0)]  # seed 2 has no SD run: left out
    row = pruning.analyse(runs, [0, 2])["random"][1]
    assert (row["n"], row["constant"], row["sd"], row["gap"]) == (2, 20.0, 13.0, -7.0)
    # Paired: differences -6 and -8, sd 1.414, t(0.975, 1) = 12.706 -> half-width 12.706.
    assert row["low"] == pytest.approx(-7.0 - 12.7062, abs=1e-3)


def test_vit_digits_pairs_by_seed_and_regenerates_from_the_committed_runs(tmp_path):
    """The small-ViT study: each mode minus row and each epoch time over constant, per seed
    (a seed missing an arm is left out of that comparison); --aggregate_only finds all 12
    committed runs by their commands and trains nothing."""
    import shutil

    from experiments.vit_digits import run as vit_digits  # noqa: PLC0415

    def run(arm, seed, error, epoch):
        return {"variant": arm, "seed": seed, "test_error": error, "epoch_time_s": epoch,
                "train_time_s": 100.0}  # fmt: skip

    runs = [
        run("constant", 0, 0.10, 2.0),
        run("row", 0, 0.05, 2.0),
        run("row_subset", 0, 0.07, 1.5),
    ]
    runs += [
        run("constant", 1, 0.08, 4.0),
        run("row", 1, 0.04, 4.0),
        run("row_subset", 1, 0.03, 2.0),
    ]
    runs += [run("row", 2, 0.06, 1.0), run("row_subset", 2, 0.06, 1.0)]  # no constant at seed 2
    out = vit_digits.analyse(runs)
    diff = out["error_minus_row"]["row_subset"]
    assert diff["per_seed"] == pytest.approx([2.0, -1.0, 0.0]) and diff["n"] == 3
    assert diff["mean"] == pytest.approx(1 / 3)
    ratio = out["epoch_time_over_constant"]["row_subset"]
    assert ratio["per_seed"] == pytest.approx([0.75, 0.5]) and ratio["n"] == 2
    assert out["error_minus_row"]["constant"]["per_seed"] == pytest.approx([5.0, 4.0])

    committed = tmp_path / "out"
    committed.mkdir()
    shutil.copy(vit_digits.RESULTS / "results.json", committed / "results.json")
    argv = ["--aggregate_only", f"--out={committed}", f"--workdirs={tmp_path / 'none'}"]
    results = vit_digits.main(argv)
    assert results["complete"] and len(results["runs"]) == 12
    assert "runs_provenance" in results and not (tmp_path / "none").exists()
