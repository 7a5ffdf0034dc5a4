"""The port-beside-sdjax study's runner and analysis (experiments/reference/paper_port)."""

import argparse
import json
import sys

import pytest

from experiments.reference.paper_port import run


def _write(folder, name, record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))


def _records(tmp_path, torch_shift=0.0):
    sdjax, port = tmp_path / "sdjax", tmp_path / "port"
    for i, seed in enumerate((100, 101, 102)):
        c, s = 0.40 + 0.01 * i, 0.41 + 0.005 * i
        _write(sdjax, f"constant_seed{seed}", {"arm": "constant", "seed": seed,
               "test_error_at_best_val": c, "test_error": c + 0.01})  # fmt: skip
        _write(sdjax, f"sd_seed{seed}", {"arm": "sd", "seed": seed,
               "test_error_at_best_val": s, "test_error": s})  # fmt: skip
        _write(port, f"constant_seed{seed}", {"variant": "constant", "seed": seed,
               "test_error_at_best_valid": c + torch_shift, "test_error": c})  # fmt: skip
        _write(port, f"sd_seed{seed}", {"variant": "sd", "seed": seed,
               "test_error_at_best_valid": s + torch_shift + 0.01 * i, "test_error": s})  # fmt: skip
    _write(port, "sd_seed7", {"variant": "sd", "seed": 7, "test_error_at_best_valid": 0.9,
           "test_error": 0.9})  # not a seed of the plan: left out  # fmt: skip
    return sdjax, port


def test_analysis_pairs_within_a_framework_and_compares_the_gaps(tmp_path):
    sdjax, port = _records(tmp_path, torch_shift=0.05)
    runs = run.load_runs(sdjax, port)
    assert len(runs) == 12 and {r["framework"] for r in runs} == {"sdjax", "torch"}
    result = run.analyse(runs)
    assert not result["complete"] and result["runs"] == {"sdjax": 6, "torch": 6}
    best = result["endpoints"]["best_val"]
    gaps = {row["framework"]: row["gap"] for row in best["gaps"]}
    # sdjax: per-seed SD - constant 0.01, 0.005, 0.0; port: 0.01, 0.015, 0.02.
    assert gaps["sdjax"]["diff"] == pytest.approx(0.005) and gaps["sdjax"]["n"] == 3
    assert gaps["torch"]["diff"] == pytest.approx(0.015)
    assert best["gap_difference"]["diff"] == pytest.approx(-0.01)
    assert best["constant_difference"]["diff"] == pytest.approx(-0.05)
    text = run.to_markdown(result)
    assert "**PARTIAL**: runs recorded sdjax 6, torch 6 of 18 each" in text
    assert "Gap difference, sdjax - port: -1.00 points" in text
    last = result["endpoints"]["last"]
    # Last epoch: sdjax's gaps 0, -0.005, -0.01 (mean -0.005); the port's 0.01, 0.005, 0.
    assert last["gap_difference"]["diff"] == pytest.approx(-0.01)


def test_port_runs_go_parallel_and_failures_are_reported(tmp_path, monkeypatch):
    args = argparse.Namespace(
        npz="x.npz", device="cpu", threads=1, parallel=3, epochs=320,
        runs_dir=str(tmp_path / "runs"), logs=str(tmp_path / "logs"),
    )  # fmt: skip
    command = run.port_command("sd", 104, args)
    assert "--variant=sd" in command and "--seed=104" in command and "--eval_every=10" in command
    assert "--depth=20" in command and "--epochs=320" in command
    _write(tmp_path / "runs", "constant_seed100", {})  # recorded: not run again
    started = []

    def fake(variant, seed, _args):
        started.append((variant, seed))
        code = 1 if (variant, seed) == ("sd", 101) else 0
        return [sys.executable, "-c", f"import sys; sys.exit({code})"]

    monkeypatch.setattr(run, "port_command", fake)
    assert run.train_missing(args) == ["sd_seed101"]
    assert len(started) == 17 and ("constant", 100) not in started
    assert (tmp_path / "logs" / "sd_seed108.log").exists()


def test_a_budget_other_than_the_plans_needs_another_runs_dir(capsys):
    with pytest.raises(SystemExit):
        run.main(["--epochs", "2", "--npz", "x.npz"])
    assert "differs from PLAN.md's 320" in capsys.readouterr().err
