"""Smoke test of `experiments/benchmark.py`: a tiny run writes the JSON report and markdown table.

The run is the script's ``--quick`` mode (cifar_resnet20, batch 16) cut down to the constant and
batch-mode settings with one warm-up and one timed step, in a subprocess, writing to a temporary
folder. No timing is asserted (a benchmark is a script that writes numbers, not a test). The
PyTorch column is expected whenever torch is importable; otherwise the report must say that it
was skipped because torch is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest

import sdjax.models as models
from experiments import benchmark

TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None


def test_ideal_ratio_of_linear_decay_matches_the_paper():
    # ResNet-110, L = 54 blocks, linear decay to 0.5: expected kept fraction 1 - 0.25 (L+1)/L.
    rates = [0.5 * layer / 54 for layer in range(1, 55)]
    ideal = benchmark.ideal_ratios("cifar_resnet110", 32, rates)
    assert ideal["unweighted_blocks"] == pytest.approx(1 - 0.25 * 55 / 54)
    # Downsampling blocks cost 3/4 of the others: the weighted ratio moves only slightly.
    assert ideal["ideal_blocks"] == pytest.approx(ideal["unweighted_blocks"], abs=0.005)
    assert ideal["ideal_blocks"] < ideal["ideal_step"] < 1.0
    # Known totals: ResNet-110 ~253M multiply-accumulates per 32x32 image, EfficientNet-B0 ~0.39G
    # at 224x224.
    assert ideal["macs_per_image"] == pytest.approx(253e6, rel=0.01)
    block_macs, has_skip, other = benchmark.efficientnet_b0_macs(224)
    assert sum(block_macs) + other == pytest.approx(0.39e9, rel=0.02)
    assert len(block_macs) == 16 and sum(has_skip) == 9


def test_kept_block_compute_is_the_realized_ideal():
    rates = [0.5 * layer / 54 for layer in range(1, 55)]
    ideal = benchmark.ideal_ratios("cifar_resnet110", 32, rates)["ideal_blocks"]
    # Each block kept with its survival probability: the expectation, i.e. the ideal.
    kept = [1.0 - r for r in rates]
    assert benchmark.kept_block_compute("cifar_resnet110", 32, kept) == pytest.approx(ideal)
    assert benchmark.kept_block_compute("cifar_resnet110", 32, [1.0] * 54) == pytest.approx(1.0)
    # One step that dropped only the last block (a full-cost stage-3 block: 1/53.5 of the
    # compute, the two downsampling blocks costing 3/4 of the others).
    one_dropped = benchmark.kept_block_compute("cifar_resnet110", 32, [1.0] * 53 + [0.0])
    assert one_dropped == pytest.approx(1.0 - 1.0 / (52 + 2 * 0.75))
    # EfficientNet-B0: a block without an identity skip counts as kept whatever it is given.
    _, has_skip, _ = benchmark.efficientnet_b0_macs(64)
    no_skip_zeroed = [1.0 if d else 0.0 for d in has_skip]
    assert benchmark.kept_block_compute("efficientnet_b0", 64, no_skip_zeroed) == 1.0
    assert benchmark.kept_block_compute("cifar_resnet110", 32, [1.0] * 3) is None


def test_parse_setting_rejects_unknown_names():
    setting = benchmark.parse_setting("batch+scan", 0.5, "linear")
    assert setting.base == "batch"
    assert setting.overrides == {
        "final_drop_rate": 0.5,
        "drop_schedule": "linear",
        "drop_mode": "batch",
        "scan_blocks": True,
    }
    assert not setting.data_parallel and setting.variant == "+scan"
    setting = benchmark.parse_setting("row+scan+dp", 0.3, "uniform")
    assert setting.data_parallel and setting.variant == "+scan+dp"
    assert setting.overrides == {
        "final_drop_rate": 0.3,
        "drop_schedule": "uniform",
        "drop_mode": "row",
        "scan_blocks": True,
    }
    with pytest.raises(ValueError, match="base must be one of"):
        benchmark.parse_setting("sometimes", 0.5, "linear")
    with pytest.raises(ValueError, match="modifier must be one of.*'dp'"):
        benchmark.parse_setting("constant+turbo", 0.5, "linear")


def test_quick_run_writes_json_and_markdown(tmp_path, repo_root):
    command = [
        sys.executable,
        "-m",
        "experiments.benchmark",
        "--quick",
        "--settings",
        "constant,batch,constant+dp",
        "--cpu_devices",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--out_dir",
        str(tmp_path),
    ]
    # The smoke test checks the plumbing, not the speed: a lower XLA backend optimization level
    # halves the compile times that dominate this run.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    result = subprocess.run(
        command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report) >= {
        "provenance",
        "machine_extra",
        "torch_status",
        "config",
        "rows",
        "compile_only",
        "summary",
        "targets",
    }
    prov = report["provenance"]
    assert prov["command"].startswith("python -m experiments.benchmark --quick")
    assert {"python", "jax", "flax"} <= set(prov["versions"])
    assert prov["machine"]["cpu_count"] >= 1 and prov["machine"]["jax_backend"]

    jax_rows = [row for row in report["rows"] if row["framework"] == "jax"]
    assert [(r["model"], r["setting"], r["devices"]) for r in jax_rows] == [
        ("cifar_resnet20", "constant", 1),
        ("cifar_resnet20", "batch", 1),
        ("cifar_resnet20", "constant+dp", 2),
    ]
    for row in jax_rows:
        assert row["batch_size"] == 16 and row["image_size"] == 32
        assert row["lower_plus_compile_s"] > 0 and row["median_ms"] > 0
        assert len(row["step_ms"]) == 1 and len(row["warmup_ms"]) == 1
        assert row["page_faults_per_step"] >= 0 and row["system_cpu_ms_per_step"] >= 0
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert report["machine_extra"]["host_malloc_applied"] is glibc  # --host_malloc auto, on CPU
    assert report["config"]["host_malloc"] == "auto"
    assert len(jax_rows[1]["block_drop_rates"]) == 9

    summary, summary_dp = report["summary"]
    assert (summary["variant"], summary_dp["variant"]) == ("", "+dp")
    assert summary_dp["batch_over_constant_median"] is None  # no batch+dp row in this run
    assert summary["ideal"]["ideal_blocks"] == pytest.approx(
        benchmark.ideal_ratios("cifar_resnet20", 32, jax_rows[1]["block_drop_rates"])[
            "ideal_blocks"
        ]
    )
    assert summary["batch_over_constant_median"] > 0
    # The gates of the one timed step (index 1, after one warm-up step), recomputed here.
    batch_model = models.create(
        "cifar_resnet20", final_drop_rate=0.5, drop_schedule="linear", drop_mode="batch"
    )
    gates = np.asarray(models.batch_gates(batch_model, jax.random.fold_in(jax.random.key(0), 1)))
    assert jax_rows[1]["blocks_run_per_step"] == [int(gates.sum())]
    realized = benchmark.kept_block_compute("cifar_resnet20", 32, gates.astype(float).tolist())
    assert jax_rows[1]["kept_block_compute_per_step"] == [pytest.approx(realized)]
    assert summary["realized_blocks"] == pytest.approx(realized)

    torch_rows = [row for row in report["rows"] if row["framework"] == "torch"]
    if TORCH_AVAILABLE:
        assert report["torch_status"].startswith("torch ")
        assert [r["setting"] for r in torch_rows] == ["constant", "batch"]
        assert summary["jax_over_torch_median"]["constant"] > 0
        assert summary_dp["jax_over_torch_median"]["constant"] == pytest.approx(
            jax_rows[2]["median_ms"] / torch_rows[0]["median_ms"]
        )
        assert 0.0 <= torch_rows[1]["branches_run_fraction"] <= 1.0
        assert len(torch_rows[1]["branches_run_per_block"]) == 9
        assert 0.0 <= summary["torch_realized_blocks"] <= 1.0
    else:
        assert report["torch_status"].startswith("skipped (torch not importable")
        assert torch_rows == []

    markdown = (tmp_path / "benchmark.md").read_text()
    assert f"`{prov['command']}`" in markdown
    assert "| model | setting | batch | input | devices | compile s | median ms |" in markdown
    assert "| cifar_resnet20 | batch | 16 | 32x32x3 | 1 |" in markdown
    assert "| cifar_resnet20 | constant+dp | 16 | 32x32x3 | 2 |" in markdown
    assert "## Targets (issue 5)" in markdown
