"""Tests of the command line: python -m sdjax.main with arg strings, overrides and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.name=cifar_resnet20",
    "--config.model.scan_blocks=False",
    "--config.train.batch_size=32",
    "--config.train.progress_bar=False",
]


def _main(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "sdjax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_trains_with_arg_string_and_overrides_then_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/digits_sd.py:steps=4,final_drop_rate=0.3", f"--workdir={workdir}"]
    proc = _main(*args, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_accuracy=" in proc.stdout
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["steps"] == 4
    assert results["config"]["model"]["final_drop_rate"] == 0.3
    assert results["config"]["model"]["name"] == "cifar_resnet20"
    # Same command with more steps: resumes from step 4 (the metrics log continues there).
    proc = _main(args[0].replace("steps=4", "steps=6"), args[1], *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert (
        min(s for s in steps if s > 4) == 6
        and json.load(open(os.path.join(workdir, "results.json")))["steps"] == 6
    )


@pytest.mark.parametrize(
    "override, patterns",
    [
        ("--config.model.drop_mode=rows", ["config.model.drop_mode='rows'", "['row', 'batch']"]),
        # Checked before JAX starts (the CPU device count is set then).
        ("--config.train.num_cpu_devices=-2", ["config.train.num_cpu_devices=-2", "integer >= 0"]),
    ],
)
def test_cli_bad_value_fails_fast_with_field_and_allowed_values(tmp_path, override, patterns):
    workdir = tmp_path / "bad"
    proc = _main("--config=configs/digits_sd.py", f"--workdir={workdir}", override)
    assert proc.returncode == 1
    for pattern in patterns:
        assert pattern in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()


def test_cli_unknown_override_field_is_rejected(tmp_path):
    proc = _main(
        "--config=configs/digits_sd.py",
        f"--workdir={tmp_path / 'typo'}",
        "--config.model.final_drop_rat=0.3",
    )
    assert proc.returncode != 0
    assert "final_drop_rat" in proc.stderr
    proc = _main("--config=configs/digits_sd.py:final_rate=0.3", f"--workdir={tmp_path / 't'}")
    assert proc.returncode != 0
    assert "unknown config argument 'final_rate'" in proc.stderr


def test_sweep_commands_and_aggregate(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import sweep  # noqa: PLC0415

    grid = sweep.parse_grid(["model.final_drop_rate=0,0.5", "seed=0,1"])
    runs = sweep.commands("configs/digits_sd.py", str(tmp_path), grid, ["--config.x=1"])
    assert len(runs) == 4
    workdir, argv = runs[1]
    assert workdir.endswith("final_drop_rate=0_seed=1")
    assert "--config.model.final_drop_rate=0" in argv and "--config.seed=1" in argv
    for i, (workdir, _) in enumerate(runs):
        os.makedirs(workdir)
        result = {
            "test_error": 0.1 * i,
            "test_accuracy": 1 - 0.1 * i,
            "steps": 5,
            "config": {"seed": i % 2, "model": {"final_drop_rate": 0.5 * (i // 2)}},
        }
        json.dump(result, open(os.path.join(workdir, "results.json"), "w"))
    rows = sweep.aggregate(str(tmp_path))
    assert len(rows) == 4
    table = open(tmp_path / "results.md").read()
    assert "model.final_drop_rate" in table and "seed" in table
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.png").stat().st_size > 0


def test_cli_num_cpu_devices_trains_data_parallel_with_the_same_losses(tmp_path, train_losses):
    """train.num_cpu_devices=2 splits the CPU into two devices (a fresh process) and shards the
    batch over them; at drop rate 0 the losses equal the one-device run up to float order."""
    losses = {}
    for devices in (1, 2):
        workdir = tmp_path / f"dev{devices}"
        proc = _main(
            "--config=configs/digits_sd.py:steps=4,final_drop_rate=0",
            f"--workdir={workdir}",
            *TINY,
            f"--config.train.num_cpu_devices={devices}",
            "--config.train.log_every_steps=1",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.load(open(workdir / "results.json"))
        assert results["devices"]["device_count"] == devices
        assert results["config"]["train"]["num_cpu_devices"] == devices
        losses[devices] = train_losses(workdir, 4)
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
    # A checkpoint written on one device resumes on two (parameters are replicated).
    proc = _main(
        "--config=configs/digits_sd.py:steps=6,final_drop_rate=0",
        f"--workdir={tmp_path / 'dev1'}",
        *TINY,
        "--config.train.num_cpu_devices=2",
        "--config.train.log_every_steps=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "dev1" / "results.json"))
    assert results["steps"] == 6 and results["devices"]["device_count"] == 2
