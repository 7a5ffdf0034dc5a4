"""The pre-registered confirmatory study's runner and analysis (experiments/confirmatory)."""

import argparse
import math
import shutil

import pytest
from scipy import stats as scipy_stats

from experiments.confirmatory import analysis, run


def _args(tmp_path, **overrides):
    fields = {
        "study": "primary",
        "data_dir": "/data/tfds",
        "npz": None,
        "train_size": run.TRAIN_SIZE,
        "epochs": run.EPOCHS,
        "eval_every_epochs": run.EVAL_EVERY_EPOCHS,
        "results_dir": str(tmp_path / "results"),
        "workdirs": str(tmp_path / "workdirs"),
    }
    return argparse.Namespace(**{**fields, **overrides})


def _record(arm, seed, best, last=None, epoch_s=1.0):
    return {
        "arm": arm,
        "seed": seed,
        "test_error_at_best_val": best / 100,
        "test_error": (best if last is None else last) / 100,
        "median_epoch_time_s": epoch_s,
    }


def test_plan_pairs_the_arms_by_seed_on_the_plans_subset_and_budget(tmp_path):
    runs = run.plan(_args(tmp_path))
    assert [(r["arm"], r["seed"]) for r in runs[:3]] == [
        ("constant", 100),
        ("sd", 100),
        ("constant", 101),
    ]
    assert len(runs) == 18 and {r["seed"] for r in runs} == set(range(100, 109))
    flags = runs[1]["command"]
    assert "--config=configs/cifar10_sd.py" in flags and "--config.seed=100" in flags
    for flag in ("input.train_size=1024", "train.num_epochs=320", "train.eval_every_epochs=10"):
        assert f"--config.{flag}" in flags
    assert "--config.input.data_dir=/data/tfds" in flags
    assert runs[1]["record"] == tmp_path / "results" / "runs" / "primary" / "sd_seed100.json"
    deep = run.plan(_args(tmp_path, study="deep56"))
    assert len(deep) == 10 and "--config.model.name=cifar_resnet56" in deep[0]["command"]
    warmup = run.plan(_args(tmp_path, study="warmup"))
    assert {r["arm"] for r in warmup} == {"warmup"}
    assert "--config.train.drop_warmup_fraction=0.25" in warmup[0]["command"]
    # The warm-up replication: its own constant arm, on seeds no other study uses.
    confirm = run.plan(_args(tmp_path, study="warmup_confirm"))
    assert [(r["arm"], r["seed"]) for r in confirm[:2]] == [("constant", 200), ("warmup", 200)]
    assert (
        len(confirm) == 18 and "--config.train.drop_warmup_fraction=0.25" in confirm[1]["command"]
    )
    assert not any("drop_warmup" in f for f in confirm[0]["command"])
    others = {
        s for name, st in run.STUDIES.items() if name != "warmup_confirm" for s in st["seeds"]
    }
    assert not others & {r["seed"] for r in confirm}
    # On a host without tfds: the pre-split export instead of the tfds folder.
    flags = run.plan(_args(tmp_path, npz="subset.npz"))[0]["command"]
    assert any(f.startswith("--config.input.npz_path=/") for f in flags)
    assert not any(f.startswith("--config.input.data_dir") for f in flags)


def test_analysis_is_paired_and_decides_only_for_the_complete_primary_study():
    constant = [30.0, 32.0, 31.0]
    sd = [29.0, 32.5, 29.5]
    records = {
        "primary": [_record("constant", 100 + i, c, epoch_s=2.0) for i, c in enumerate(constant)]
        + [_record("sd", 100 + i, s, last=s + 1, epoch_s=1.5) for i, s in enumerate(sd)]
    }
    partial = analysis.analyse("primary", records, planned_runs=18)
    entry = partial["endpoints"]["test_error_at_best_val"]
    diffs = [s - c for s, c in zip(sd, constant, strict=True)]
    assert entry["mean_diff"] == pytest.approx(sum(diffs) / 3) and entry["df"] == 2
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.tstd(diffs) / math.sqrt(3)
    assert entry["high"] - entry["mean_diff"] == pytest.approx(half)
    assert "decision" not in entry and not partial["complete"]
    assert "PARTIAL: 6 of 18 runs" in analysis.to_markdown(partial)
    last = partial["endpoints"]["test_error"]
    assert last["mean_diff"] == pytest.approx(sum(diffs) / 3 + 1)
    assert partial["median_epoch_time_ratio"]["mean"] == pytest.approx(0.75)

    complete = analysis.analyse("primary", records, planned_runs=6)
    decision = complete["endpoints"]["test_error_at_best_val"]["decision"]
    assert decision.startswith("inconclusive") and "consistent with the paper's -1.16" in decision
    assert "Decision (PLAN.md rule): inconclusive" in analysis.to_markdown(complete)
    assert "decision" not in complete["endpoints"]["test_error"]  # secondary endpoint
    # A secondary study is reported without a decision, complete or not.
    deep = {"deep56": [{**r} for r in records["primary"]]}
    assert (
        "decision" not in analysis.analyse("deep56", deep, 6)["endpoints"]["test_error_at_best_val"]
    )
    # The warm-up arm pairs with the primary study's constant runs.
    warm = {
        "primary": records["primary"],
        "warmup": [_record("warmup", 100 + i, c - 1) for i, c in enumerate(constant)],
    }
    result = analysis.analyse("warmup", warm, 9)
    entry = result["endpoints"]["test_error_at_best_val"]
    assert entry["n"] == 3 and entry["mean_diff"] == pytest.approx(-1.0)
    # Its epoch times are not paired with runs that trained elsewhere.
    assert "median_epoch_time_ratio" not in result
    assert "Epoch times are not compared" in analysis.to_markdown(result)


def test_the_warmup_replication_has_its_own_decision_rule_and_plan():
    records = {
        "warmup_confirm": [_record("constant", 200 + i, 40.0 + i, epoch_s=2.0) for i in range(3)]
        + [_record("warmup", 200 + i, 38.0 + i + 0.1 * i, epoch_s=1.8) for i in range(3)]
    }
    partial = analysis.analyse("warmup_confirm", records, planned_runs=18)
    assert "decision" not in partial["endpoints"]["test_error_at_best_val"]
    complete = analysis.analyse("warmup_confirm", records, planned_runs=6)
    entry = complete["endpoints"]["test_error_at_best_val"]
    assert entry["mean_diff"] == pytest.approx(-1.9) and entry["high"] < 0
    assert entry["decision"].startswith("stochastic depth with warm-up lowers test error")
    assert complete["median_epoch_time_ratio"]["mean"] == pytest.approx(0.9)
    text = analysis.to_markdown(complete)
    assert "(PLAN_warmup_confirm.md)" in text and "Decision (PLAN_warmup_confirm.md rule)" in text
    assert (run.HERE / "PLAN_warmup_confirm.md").is_file()


def test_the_table_names_each_pairs_host_and_flags_a_pair_split_across_hosts():
    avx2 = {"cpu": "AMD EPYC", "cpu_isa": ["AVX2"]}
    avx512 = {"cpu": "AMD EPYC", "cpu_isa": ["AVX2", "AVX-512"]}
    gpu = {"platform": "gpu", "device_kind": "NVIDIA H100"}
    runs = [
        {**_record("constant", 100, 40.0), "machine": avx2},
        {**_record("sd", 100, 39.0), "machine": avx2},
        {**_record("constant", 101, 41.0), "machine": avx512},
        {**_record("sd", 101, 40.0), "machine": avx2},
        {**_record("constant", 102, 41.0), "machine": avx2, "devices": gpu},
        {**_record("sd", 102, 40.0), "machine": avx2, "devices": gpu},
    ]
    result = analysis.analyse("deep56", {"deep56": runs}, 6)
    assert result["hosts"] == {
        "runs_per_host": {
            "AMD EPYC (AVX2)": 3,
            "AMD EPYC (AVX2, AVX-512)": 1,
            "NVIDIA H100 (gpu)": 2,
        },
        "mixed_seeds": [101],
    }
    assert "the two runs of seed(s) 101 name different hosts" in analysis.to_markdown(result)
    same = analysis.analyse("deep56", {"deep56": runs[:2] + runs[4:]}, 4)
    assert "the two runs of every pair name one host" in analysis.to_markdown(same)


@pytest.mark.parametrize(
    "low, high, verdict, paper",
    [
        (-2.0, -0.5, "lowers", "consistent with"),
        (-0.9, -0.1, "lowers", "excludes"),
        (0.2, 1.0, "raises", "excludes"),
        (-1.0, 1.0, "inconclusive", "excludes"),
    ],
)
def test_decision_rule_of_the_plan(low, high, verdict, paper):
    text = analysis.decide(low, high)
    assert verdict in text and f"{paper} the paper's -1.16" in text


def test_a_budget_other_than_the_plans_is_refused_for_the_committed_results(capsys):
    with pytest.raises(SystemExit):
        run.main(["--study", "primary", "--epochs", "2"])
    assert "differ from the plan's (1024, 320, 10)" in capsys.readouterr().err


@pytest.mark.parametrize("study", sorted(run.STUDIES))
def test_the_committed_tables_regenerate_from_the_committed_records(tmp_path, study):
    """Tables are generated: `--aggregate_only` on a copy of the records writes the committed
    table byte for byte."""
    shutil.copytree(run.RESULTS / "runs", tmp_path / "runs")
    run.main(["--study", study, "--aggregate_only", "--results_dir", str(tmp_path)])
    committed = (run.RESULTS / study / "results.md").read_text()
    assert (tmp_path / study / "results.md").read_text() == committed
