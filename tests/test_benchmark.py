"""The train-step benchmark (`experiments/benchmark/benchmark.py`, `experiments/benchmark/bench/`): settings, MAC
counts, ratios, targets and the report on fixed inputs, and one tiny run end to end.

The run is the script's ``--quick`` mode (cifar_resnet20, batch 16) with one constant-depth row
on one device and one batch-mode data-parallel row on two CPU devices, one warm-up and one timed
step, in a subprocess. No timing is asserted (a benchmark is a script that writes numbers).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdjax.models as models
from experiments import common
from experiments.benchmark import benchmark
from experiments.benchmark.bench import analysis, macs, report, settings, timing, transformer

TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None
LINEAR_110 = [0.5 * layer / 54 for layer in range(1, 55)]


def test_ideal_ratio_weights_blocks_by_their_macs():
    ideal = macs.ideal_ratios("cifar_resnet110", 32, LINEAR_110)
    # Linear decay to 0.5 over L = 54 blocks keeps 1 - 0.25 (L + 1) / L of the blocks.
    assert ideal["unweighted_blocks"] == pytest.approx(1 - 0.25 * 55 / 54)
    # Every block costs the same except the first of stages 2 and 3 (stride 2): 3/4.
    weights = np.ones(54)
    weights[[18, 36]] = 0.75
    expected = np.sum(weights * (1 - np.array(LINEAR_110))) / np.sum(weights)
    assert ideal["ideal_blocks"] == pytest.approx(expected)
    # ResNet-110: 253M multiply-accumulates per 32x32 image; EfficientNet-B0: 0.39G at 224.
    assert ideal["macs_per_image"] == pytest.approx(253e6, rel=0.01)
    block_macs, has_skip, other = macs.block_compute("efficientnet_b0", 224)
    assert sum(block_macs) + other == pytest.approx(0.39e9, rel=0.02)
    assert len(block_macs) == models.create("efficientnet_b0").num_blocks == 16
    assert has_skip == [r > 0 for r in models.create("efficientnet_b0").effective_block_rates()]


def test_transformer_macs_match_its_parameters():
    stack = transformer.TransformerMLPStack(**settings.TRANSFORMER_FIELDS)
    tokens, width = settings.TRANSFORMER_INPUT
    params = jax.eval_shape(stack.init, jax.random.key(0), jnp.zeros((1, tokens, width)))["params"]
    block_macs, droppable, other = macs.block_compute(transformer.NAME, tokens)
    branch = params["block0"]["branch"]
    dense_params = math.prod(branch["fc1"]["kernel"].shape) + math.prod(
        branch["fc2"]["kernel"].shape
    )
    assert block_macs == [tokens * dense_params] * 12 and all(droppable)
    assert other == math.prod(params["head"]["kernel"].shape)


def test_kept_block_compute_is_the_realized_ideal():
    ideal = macs.ideal_ratios("cifar_resnet110", 32, LINEAR_110)["ideal_blocks"]
    kept = [1.0 - r for r in LINEAR_110]  # each block kept with its survival probability
    assert macs.kept_block_compute("cifar_resnet110", 32, kept) == pytest.approx(ideal)
    assert macs.kept_block_compute("cifar_resnet110", 32, [1.0] * 54) == pytest.approx(1.0)
    one_dropped = macs.kept_block_compute("cifar_resnet110", 32, [1.0] * 53 + [0.0])
    assert one_dropped == pytest.approx(1.0 - 1.0 / (52 + 2 * 0.75))
    # EfficientNet-B0: a block without an identity skip counts as kept whatever it is given.
    _, has_skip, _ = macs.block_compute("efficientnet_b0", 64)
    no_skip_zeroed = [1.0 if d else 0.0 for d in has_skip]
    assert macs.kept_block_compute("efficientnet_b0", 64, no_skip_zeroed) == 1.0
    assert macs.kept_block_compute("cifar_resnet110", 32, [1.0] * 3) is None
    torch_row = {"branches_run_per_block": [0.0 if d else 0.5 for d in has_skip if d]}
    assert macs.torch_kept_block_compute("efficientnet_b0", 64, torch_row) == pytest.approx(
        macs.kept_block_compute("efficientnet_b0", 64, [0.0 if d else 1.0 for d in has_skip])
    )


def test_parse_setting_names_base_and_modifiers():
    setting = settings.parse_setting("batch+scan", 0.5, "linear")
    assert setting.base == "batch" and setting.variant == "+scan" and not setting.data_parallel
    assert setting.overrides == {
        "final_drop_rate": 0.5,
        "drop_schedule": "linear",
        "drop_mode": "batch",
        "scan_blocks": True,
    }
    setting = settings.parse_setting("row_subset+scan+dp", 0.3, "uniform")
    assert setting.base == "row_subset" and setting.data_parallel
    assert setting.variant == "+scan+dp" and setting.overrides["drop_mode"] == "row_subset"
    assert settings.parse_setting("constant+xla", 0.5, "linear").overrides == {
        "final_drop_rate": 0.0,
        "conv_impl": "xla",
    }
    with pytest.raises(ValueError, match="base must be one of"):
        settings.parse_setting("sometimes", 0.5, "linear")
    with pytest.raises(ValueError, match="modifier must be one of.*'dp'"):
        settings.parse_setting("constant+turbo", 0.5, "linear")


def test_layer_mode_check_names_the_mode():
    settings.check_layer_mode("row")
    with pytest.raises(ValueError, match="'sometimes'"):
        settings.check_layer_mode("sometimes")


def test_transformer_workload_has_its_own_rate_and_modifiers():
    argv = ["--quick", "--models", f"cifar_resnet20,{transformer.NAME}"]
    args = benchmark.parse_args([*argv, "--settings", "batch+scan", "--transformer_settings",
                                 "constant,row+dp"])  # fmt: skip
    assert [(n, s.name) for n, s in benchmark.plan(args)] == [
        ("cifar_resnet20", "batch+scan"),
        (transformer.NAME, "constant"),
        (transformer.NAME, "row+dp"),
    ]
    wl = settings.workload(transformer.NAME, args)
    assert (wl.batch_size, wl.input_shape) == (64, (64, 384))
    model = settings.build_model(transformer.NAME, wl.setting("row"))
    assert model.effective_block_rates() == (0.4,) * 12
    with pytest.raises(ValueError, match="'scan'"):
        settings.build_model(transformer.NAME, wl.setting("row+scan"))


def test_transformer_stack_batch_gates_are_the_blocks_it_runs():
    """Batch mode: a block whose gate is off leaves the stream unchanged."""
    model = transformer.TransformerMLPStack(num_blocks=3, drop_mode="batch", final_drop_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    variables = model.init(jax.random.key(0), x)
    train_apply = jax.jit(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))
    kept_apply = jax.jit(lambda v: model.clone(final_drop_rate=0.0).apply(v, x, train=True))
    for seed in range(3):
        key = jax.random.key(seed)
        gates = np.asarray(models.batch_gates(model, key))
        # The same blocks with the dropped ones' second layer zeroed: their branch adds 0.
        params = jax.tree.map(lambda a: a, variables["params"])
        for index, gate in enumerate(gates):
            if not gate:
                fc2 = params[f"block{index}"]["branch"]["fc2"]
                params[f"block{index}"]["branch"]["fc2"] = jax.tree.map(jnp.zeros_like, fc2)
            else:  # kept: scaled by 1 / (1 - rate) in training
                fc2 = params[f"block{index}"]["branch"]["fc2"]
                params[f"block{index}"]["branch"]["fc2"] = jax.tree.map(lambda a: a * 2.0, fc2)
        out = train_apply(variables, key)
        expected = kept_apply({"params": params})
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _jax_row(model, setting, median, devices=1, **extra):
    return {
        "framework": "jax",
        "model": model,
        "setting": setting,
        "median_ms": median,
        "mean_ms": median + 1.0,
        "min_ms": median,
        "max_ms": median,
        "devices": devices,
        "image_size": 32,
        "batch_size": 128,
        "input_shape": [32, 32, 3],
        "lower_plus_compile_s": 10.0,
        "block_drop_rates": LINEAR_110 if setting.split("+")[0] != "constant" else [0.0] * 54,
        **extra,
    }


def _torch_row(model, setting, median):
    return {"framework": "torch", "model": model, "setting": setting, "median_ms": median,
            "mean_ms": median}  # fmt: skip


ROWS = [
    _jax_row("cifar_resnet110", "constant+scan", 1000.0),
    _jax_row("cifar_resnet110", "row+scan", 1040.0),
    _jax_row("cifar_resnet110", "row_subset+scan", 850.0),
    _jax_row("cifar_resnet110", "batch+scan", 780.0, kept_block_compute_per_step=[0.7, 0.8]),
    _jax_row("cifar_resnet110", "constant+scan+dp", 600.0, devices=2, lower_plus_compile_s=25.0),
    _torch_row("cifar_resnet110", "constant", 800.0),
    _torch_row("cifar_resnet110", "row", 900.0),
    _torch_row("cifar_resnet110", "row_subset", 720.0),
]


def test_summary_ratios_within_modifier_groups():
    summary = analysis.summarize_models(ROWS)
    assert [(e["model"], e["variant"]) for e in summary] == [
        ("cifar_resnet110", "+scan"),
        ("cifar_resnet110", "+scan+dp"),
    ]
    scan, dp = summary
    assert scan["batch_over_constant_median"] == pytest.approx(0.78)
    assert scan["batch_over_constant_mean"] == pytest.approx(781.0 / 1001.0)
    assert scan["row_overhead_median"] == pytest.approx(0.04)
    assert scan["row_subset_over_constant_median"] == pytest.approx(0.85)
    assert scan["row_subset_over_row_median"] == pytest.approx(850.0 / 1040.0)
    assert scan["torch_row_subset_over_row_median"] == pytest.approx(0.8)
    assert scan["torch_batch_over_constant_median"] is None  # no PyTorch batch row
    assert scan["realized_blocks"] == pytest.approx(0.75)
    assert scan["ideal"] == macs.ideal_ratios("cifar_resnet110", 32, LINEAR_110)
    assert scan["jax_over_torch_median"]["constant"] == pytest.approx(1.25)
    assert scan["jax_over_torch_median"]["row_subset"] == pytest.approx(850.0 / 720.0)
    assert dp["jax_over_torch_median"]["constant"] == pytest.approx(0.75)
    assert dp["batch_over_constant_median"] is None and dp["devices"] == 2


def test_targets_met_and_missed():
    summary = analysis.summarize_models(ROWS)
    targets = analysis.evaluate_targets(ROWS, summary, [])
    verdicts = {(t["kind"], round(t["value"], 4), t["limit"]): t["met"] for t in targets}
    assert verdicts == {
        ("ratio", 0.78, 0.80): True,  # batch / constant
        ("ratio", 0.85, 0.82): False,  # row-subset / constant
        ("overhead", 0.04, 0.05): True,  # masked row overhead
        ("ratio", 1.25, 1.0): False,  # sdjax / PyTorch, +scan
        ("ratio", 0.75, 1.0): True,  # sdjax / PyTorch, +scan+dp
        ("seconds", 25.0, 20.0): False,  # slowest compile of the model's rows
    }
    # Row subset "faster than masked row" is strict: a ratio of exactly 1 misses.
    rows = [
        _jax_row("efficientnet_b0", "row", 100.0),
        _jax_row("efficientnet_b0", "row_subset", 100.0),
    ]
    (target,) = analysis.evaluate_targets(rows, analysis.summarize_models(rows), [])
    assert target["value"] == 1.0 and not target["met"]


def _table_rows(markdown: str, first_header: str, second_header: str) -> list[list[str]]:
    """The body cells of the markdown table whose first two header cells are given."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [first_header, second_header]:
            body = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                body.append([c.strip() for c in row.strip("|").split("|")])
            return body
    raise AssertionError(f"no table with headers {first_header}, {second_header}")


def test_report_renders_the_rows_it_was_given():
    summary = analysis.summarize_models(ROWS)
    result = {
        "provenance": {
            "command": "python -m experiments.benchmark.benchmark",
            "date_utc": "2026-01-01T00:00:00+00:00",
            "git_commit": "abc",
            "versions": {"jax": "0"},
            "machine": {"cpu": "CPU", "cpu_isa": ["AVX2"], "cpu_count": 2, "platform": "Linux"},
        },
        "machine_extra": {
            "cpus_available": 2,
            "host_malloc_applied": True,
            "loadavg_start": (0, 0, 0),
            "loadavg_end": (0, 0, 0),
        },
        "torch_status": "torch",
        "config": {
            "warmup": 1,
            "steps": 2,
            "drop_schedule": "linear",
            "final_drop_rate": 0.5,
            "dtype": None,
        },  # fmt: skip
        "rows": ROWS,
        "compile_only": [],
        "summary": summary,
        "targets": analysis.evaluate_targets(ROWS, summary, []),
    }
    markdown = report.render_markdown(result)
    steps = _table_rows(markdown, "model", "setting")
    jax_rows = [r for r in ROWS if r["framework"] == "jax"]
    assert [(c[0], c[1], c[4], c[6]) for c in steps] == [
        (r["model"], r["setting"], str(r["devices"]), f"{r['median_ms']:.1f}") for r in jax_rows
    ]
    # Each sdjax row sits beside the PyTorch row of its base setting (none for batch).
    assert [c[9] for c in steps] == ["800.0", "900.0", "720.0", "n/a", "800.0"]
    sd = _table_rows(markdown, "model", "modifiers")
    assert [(c[0], c[1]) for c in sd] == [("cifar_resnet110", "+scan")]
    targets = _table_rows(markdown, "target", "measured")
    assert [c[2] for c in targets] == ["met" if t["met"] else "missed" for t in result["targets"]]


def test_quick_run_times_the_package_step(tmp_path, repo_root):
    command = [
        sys.executable,
        "-m",
        "experiments.benchmark.benchmark",
        "--quick",
        "--settings",
        "constant,batch+dp",
        "--cpu_devices",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--out_dir",
        str(tmp_path),
    ]
    # The run checks the plumbing, not the speed (XLA_FLAGS from conftest: a low LLVM level).
    result = subprocess.run(
        command, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = json.loads((tmp_path / "benchmark.json").read_text())
    prov = out["provenance"]
    assert prov["command"].startswith("python -m experiments.benchmark.benchmark --quick")
    assert prov["machine"]["cpu_isa"] == common.cpu_isa()
    jax_rows = [row for row in out["rows"] if row["framework"] == "jax"]
    assert [(r["model"], r["setting"], r["devices"]) for r in jax_rows] == [
        ("cifar_resnet20", "constant", 1),
        ("cifar_resnet20", "batch+dp", 2),
    ]
    for row in jax_rows:
        assert (row["batch_size"], row["input_shape"]) == (16, [32, 32, 3])
        assert len(row["step_ms"]) == 1 and len(row["warmup_ms"]) == 1
        assert np.isfinite(row["final_loss"])
    batch_row = jax_rows[1]
    model = models.create(
        "cifar_resnet20", final_drop_rate=0.5, drop_schedule="linear", drop_mode="batch"
    )
    assert batch_row["block_drop_rates"] == pytest.approx(list(model.block_rates(9)))
    # The timed step is the second one (state.step == 1): the blocks the package's step reported
    # running are its gates under sdjax.models.batch_gates.
    train_key = jax.random.fold_in(jax.random.key(0), 1)
    gates = np.asarray(models.batch_gates(model, timing.dropout_key(train_key, 1)))
    assert batch_row["blocks_run_per_step"] == [int(gates.sum())]
    realized = macs.kept_block_compute("cifar_resnet20", 32, gates.astype(float).tolist())
    assert batch_row["kept_block_compute_per_step"] == [pytest.approx(realized)]

    torch_rows = [row for row in out["rows"] if row["framework"] == "torch"]
    if TORCH_AVAILABLE:
        assert [r["setting"] for r in torch_rows] == ["constant", "batch"]
        assert len(torch_rows[1]["branches_run_per_block"]) == 9
    else:
        assert out["torch_status"].startswith("skipped (torch not importable")
        assert torch_rows == []
    assert out["summary"] == analysis.summarize_models(out["rows"])
    steps = _table_rows((tmp_path / "benchmark.md").read_text(), "model", "setting")
    assert [(c[0], c[1]) for c in steps] == [(r["model"], r["setting"]) for r in jax_rows]


def test_row_subset_settings_build_and_run():
    for name in ("cifar_resnet20", transformer.NAME):
        assert settings.build_model(name, settings.parse_setting("row_subset", 0.4, "uniform"))
    model = transformer.TransformerMLPStack(num_blocks=2, drop_mode="row_subset")
    x = jax.random.normal(jax.random.key(0), (10, 4, 8))
    variables = model.init(jax.random.key(1), x)
    out = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert out.shape == (10, settings.NUM_CLASSES) and bool(jnp.all(jnp.isfinite(out)))


def test_unrolled_rows_and_row_subset_shards_per_device():
    assert settings.parse_setting("constant+unrolled+xla", 0.5, "linear").overrides == {
        "final_drop_rate": 0.0,
        "scan_blocks": False,
        "conv_impl": "xla",
    }
    # The models scan by default: the comparison rows must say unrolled.
    for item in settings.DEFAULT_EXTRA:
        name, _, setting_name = item.partition(":")
        model = settings.build_model(name, settings.parse_setting(setting_name, 0.5, "linear"))
        assert model.scan_blocks is False, item
    for name in ("cifar_resnet20", transformer.NAME):
        shards = {
            setting: settings.build_model(
                name, settings.parse_setting(setting, 0.4, "uniform"), devices=4
            ).drop_shards
            for setting in ("row_subset+dp", "row_subset", "row+dp")
        }
        assert shards == {"row_subset+dp": 4, "row_subset": 1, "row+dp": 1}, name


def test_torch_row_subset_runs_the_branch_on_k_samples(torch):
    from experiments.reference import torch_models  # noqa: PLC0415

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return torch.ones_like(x)

    residual = torch_models.StochasticResidual(Recorder(), 0.4, "row_subset", True)
    residual.train()
    torch.manual_seed(0)
    shortcut = torch.zeros(10, 3)
    out = residual(shortcut, shortcut)
    assert calls == [6]  # k = max(1, round(0.6 * 10))
    kept = out[:, 0] != 0
    assert int(kept.sum()) == 6 and torch.allclose(out[kept], torch.full((6, 3), 10 / 6))


def test_setting_rates_name_the_peer_and_the_group():
    setting = settings.parse_setting("row_subset@0.4+scan", 0.5, "linear")
    assert (setting.base, setting.peer, setting.variant) == (
        "row_subset",
        "row_subset@0.4",
        "+scan",
    )
    assert setting.overrides["final_drop_rate"] == 0.4
    assert settings.parse_setting("row", 0.5, "linear").peer == "row"
    with pytest.raises(ValueError, match="constant depth takes no @RATE"):
        settings.parse_setting("constant@0.1", 0.5, "linear")
    for bad in ("row@", "row@1.5", "row@x"):
        with pytest.raises(ValueError, match=r"@RATE must be a drop rate in \[0, 1\]"):
            settings.parse_setting(bad, 0.5, "linear")
    assert [analysis.variant(n) for n in ("row@0.4+scan", "row@0.1", "batch+dp")] == [
        "@0.4+scan",
        "@0.1",
        "+dp",
    ]
    # A rate group has no constant row: its SD rows compare with the rate-less constant rows.
    rows = [
        _jax_row("vit_s16", "constant", 1000.0),
        _jax_row("vit_s16", "row@0.4", 800.0),
        _jax_row("vit_s16", "row_subset@0.4", 600.0),
        _jax_row("vit_s16", "row@0.1", 950.0),
        _jax_row("vit_s16", "row_subset@0.1", 1000.0),
        _torch_row("vit_s16", "constant", 900.0),
        _torch_row("vit_s16", "row@0.4", 700.0),
        _torch_row("vit_s16", "row_subset@0.4", 560.0),
    ]
    summary = {e["variant"]: e for e in analysis.summarize_models(rows)}
    assert list(summary) == ["", "@0.4", "@0.1"]
    assert summary["@0.4"]["row_subset_over_row_median"] == pytest.approx(0.75)
    assert summary["@0.4"]["row_subset_over_constant_median"] == pytest.approx(0.6)
    assert summary["@0.4"]["torch_row_subset_over_row_median"] == pytest.approx(0.8)
    assert summary["@0.4"]["torch_row_overhead_median"] == pytest.approx(700 / 900 - 1)
    assert summary["@0.4"]["jax_over_torch_median"]["constant"] is None  # counted once, in ""
    assert summary[""]["jax_over_torch_median"]["constant"] == pytest.approx(1000 / 900)
    assert summary["@0.1"]["row_subset_over_row_median"] == pytest.approx(1000 / 950)


def test_vit_workload_plan_and_macs():
    args = benchmark.parse_args(["--models", "vit_s16,cifar_resnet20", "--settings", "constant"])
    assert [(n, s.name) for n, s in benchmark.plan(args)] == [
        ("vit_s16", "constant"),
        ("vit_s16", "row@0.1"),
        ("vit_s16", "row_subset@0.1"),
        ("vit_s16", "row@0.4"),
        ("vit_s16", "row_subset@0.4"),
        ("cifar_resnet20", "constant"),
    ]
    wl = settings.workload("vit_s16", args)
    assert (wl.batch_size, wl.input_shape, wl.num_classes) == (16, (224, 224, 3), 1000)
    model = settings.build_model("vit_s16", wl.setting("row_subset@0.4"))
    assert (model.num_classes, model.drop_mode, model.final_drop_rate) == (1000, "row_subset", 0.4)
    rates = macs.block_drop_rates(model)  # per branch: attention and MLP of each block
    assert rates == pytest.approx([0.4 * (b // 2) / 11 for b in range(24)])
    block_macs, droppable, other = macs.block_compute("vit_s16", 224)
    assert len(block_macs) == 24 and all(droppable)
    # DeiT-S: 4.6 G multiply-accumulates per 224x224 image.
    assert sum(block_macs) + other == pytest.approx(4.6e9, rel=0.01)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models", "vit_s16", "--vit_settings", "constant@0.4"])


def test_vit_workload_times_one_tiny_step(torch):
    """The ViT rows' plumbing on a 32x32 image, batch 2: one sdjax step and its PyTorch peer."""
    from experiments.benchmark.bench import torch_peer  # noqa: PLC0415

    args = benchmark.parse_args(
        ["--models", "vit_s16", "--vit_image_size", "32", "--vit_batch_size", "2",
         "--warmup", "0", "--steps", "1"]
    )  # fmt: skip
    wl = settings.workload("vit_s16", args)
    setting = wl.setting("row_subset@0.4")
    row = timing.run_jax("vit_s16", setting, wl, args)
    assert (row["setting"], row["input_shape"], len(row["step_ms"])) == (
        "row_subset@0.4",
        [32, 32, 3],
        1,
    )
    assert np.isfinite(row["final_loss"]) and len(row["block_drop_rates"]) == 24
    trow = torch_peer.run_torch("vit_s16", setting, wl, row["block_drop_rates"], True, args)
    assert trow["setting"] == "row_subset@0.4" and np.isfinite(trow["final_loss"])
    # The peer has sdjax's parameters at this size (position embedding of 4 + 1 tokens).
    assert trow["num_params"] == row["num_params"]
    full = torch_peer.create(
        "vit_s16", settings.Workload(1, (224, 224, 3), 0.0, "linear", 1000),
        drop_rates=None, drop_mode="row", scale_by_keep=True,
    )  # fmt: skip
    assert sum(p.numel() for p in full.parameters()) == 22_050_664  # timm deit_small_patch16_224


def test_rounds_interleave_the_sdjax_rows(tmp_path, monkeypatch):
    """--rounds 2: every row compiled and warmed up first, then one step of each row in turn,
    twice; each row reports its own two timed steps."""
    calls = []
    run = timing.StepRunner.run

    def recording_run(self, num_steps):
        calls.append((id(self), num_steps))
        run(self, num_steps)

    monkeypatch.setattr(timing.StepRunner, "run", recording_run)
    argv = ["--quick", "--settings", "constant,batch", "--no_torch", "--warmup", "1"]
    argv += ["--steps", "2", "--rounds", "2", "--out_dir", str(tmp_path)]
    out = benchmark.main(argv)
    a, b = calls[0][0], calls[1][0]
    assert a != b
    assert calls == [(a, 1), (b, 1), (a, 1), (b, 1), (a, 1), (b, 1)]
    rows = [r for r in out["rows"] if r["framework"] == "jax"]
    assert [r["setting"] for r in rows] == ["constant", "batch"]
    for row in rows:
        assert row["rounds"] == 2 and len(row["step_ms"]) == 2 and len(row["warmup_ms"]) == 1
    assert "interleaved in 2 rounds" in (tmp_path / "benchmark.md").read_text()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--quick", "--steps", "3", "--rounds", "2"])
