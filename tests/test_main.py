"""Tests of the command line: python -m sdjax.main with arg strings, overrides and errors."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from workdir_digest import tree_digest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=tests/tiny_config.py"


def _main(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "sdjax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_trains_with_arg_string_and_overrides_then_resumes_on_two_devices(tmp_path):
    """A run on one CPU device, then the same workdir resumed on two
    (``train.num_cpu_devices=2``: ``sdjax.runtime.setup`` splits the CPU in the fresh process
    and the batch is sharded over both) with more steps. The two-device resume restored the
    step-4 weights: its losses equal those of a copy of the workdir resumed on one device (that
    data-parallel losses equal one device's is tested in ``test_multihost.py`` and
    ``test_multidevice.py``)."""
    workdir = tmp_path / "run"
    args = [f"{TINY}:steps=4,final_drop_rate=0.3", f"--workdir={workdir}"]
    proc = _main(*args, "--config.model.scan_blocks=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_accuracy=" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 4 and results["command"].endswith("--config.model.scan_blocks=False")
    assert results["config"]["model"]["final_drop_rate"] == 0.3
    assert results["config"]["model"]["scan_blocks"] is False
    assert results["devices"]["device_count"] == 1
    assert results["host_malloc_applied"] in (True, False)  # runtime.setup ran
    one_device = tmp_path / "one_device"
    shutil.copytree(workdir, one_device)
    # More steps change the trajectory (the schedule): accepted with the override, and the
    # rerun resumes from the checkpoint at step 4 (a restart would log steps 2, 3, 4 again).
    longer = [args[0].replace("steps=4", "steps=6"), "--config.model.scan_blocks=False",
              "--config.train.allow_config_change=True"]  # fmt: skip
    proc = _main(*longer, args[1], "--config.train.num_cpu_devices=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 3, 4, 6]  # no step twice
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 6 and results["devices"]["device_count"] == 2
    proc = _main(*longer, f"--workdir={one_device}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((one_device / "results.json").read_text())
    assert expected["devices"]["device_count"] == 1
    for key in ("final_train_loss", "test_loss"):
        assert results[key] == pytest.approx(expected[key], rel=1e-4), key


@pytest.fixture
def previous_run(tmp_path) -> pathlib.Path:
    """A workdir holding an earlier run's files (they must survive any bad command)."""
    workdir = tmp_path / "previous"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "results.json").write_text('{"test_accuracy": 0.97}')
    (workdir / "metrics.jsonl").write_text('{"step": 4, "train_loss": 0.1}\n')
    return workdir


@pytest.mark.parametrize(
    "args, code, patterns",
    [
        (["--config=configs/nope.py"], 2, ["configs/nope.py", "No such file"]),
        (["--config=BAD_FILE"], 2, ["bad_config.py:1", "invalid syntax"]),
        ([f"{TINY}:final_drop_rate=abc"], 2, ["final_drop_rate='abc'", "expected a float"]),
        ([f"{TINY}:final_rate=0.3"], 2, ["unknown config argument 'final_rate'", "final_drop_rate"]),
        ([TINY, "--config.model.final_drop_rat=0.3"], 2, ["final_drop_rat ", "model.final_drop_rate"]),
        ([TINY, "--config.modle.name=cifar_resnet20"], 2, ["modle", "model.name"]),
        ([TINY, "--config.train.batch_size=many"], 2, ["train.batch_size=many", "int"]),
        ([TINY, "--config.model.drop_mode=rows"], 1, ["config.model.drop_mode='rows'", "batch"]),
        # Checked before the process set-up (the CPU device count is set there).
        ([TINY, "--config.train.num_cpu_devices=-2"], 1, ["num_cpu_devices=-2", "integer >= 0"]),
    ],
    ids=["missing-file", "syntax", "arg-value", "arg-key", "field", "section", "type", "value",
         "devices"],
)  # fmt: skip
def test_cli_errors_are_one_line_and_leave_the_workdir_alone(
    args, code, patterns, tmp_path, previous_run
):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config(:\n    pass\n")
    args = [a.replace("BAD_FILE", str(bad)) for a in args]
    for workdir in (previous_run, tmp_path / "fresh"):
        before = tree_digest(previous_run)
        proc = _main(*args, f"--workdir={workdir}")
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for pattern in patterns:
            assert pattern in errors[0], errors[0]
        assert tree_digest(previous_run) == before
    assert not (tmp_path / "fresh").exists()


def test_sweep_commands_and_aggregate(tmp_path):
    """The grid's commands, then the tables of four hand-written results: every row holds its
    run's config values and metrics (literals), in the files' row order."""
    from experiments.sweep import sweep  # noqa: PLC0415

    grid = sweep.parse_grid(["model.final_drop_rate=0,0.5", "seed=0,1"])
    runs = sweep.commands("configs/digits_sd.py", str(tmp_path), grid, ["--config.x=1"])
    names = ["final_drop_rate=0_seed=0", "final_drop_rate=0_seed=1",
             "final_drop_rate=0.5_seed=0", "final_drop_rate=0.5_seed=1"]  # fmt: skip
    assert [w for w, _ in runs] == [str(tmp_path / n) for n in names]
    assert runs[1][1] == [
        sys.executable, "-m", "sdjax.main", "--config=configs/digits_sd.py",
        f"--workdir={tmp_path / names[1]}", "--config.model.final_drop_rate=0", "--config.seed=1",
        "--config.x=1",
    ]  # fmt: skip
    errors = {names[0]: 0.25, names[1]: 0.125, names[2]: 0.5, names[3]: 0.375}
    for workdir, argv in runs:
        rate, seed = float(argv[5].split("=")[1]), int(argv[6].split("=")[1])
        os.makedirs(workdir)
        error = errors[pathlib.Path(workdir).name]
        result = {"test_error": error, "test_accuracy": 1 - error, "steps": 5,
                  "config": {"seed": seed, "model": {"final_drop_rate": rate, "depth": 20}}}  # fmt: skip
        pathlib.Path(workdir, "results.json").write_text(json.dumps(result))
    rows = sweep.aggregate(str(tmp_path))
    assert [r["run"] for r in rows] == sorted(names)  # '.' sorts before '_'
    assert [r["test_error"] for r in rows] == [0.5, 0.375, 0.25, 0.125]
    expected = [
        ("final_drop_rate=0.5_seed=0", 0.5, 0, 0.5, 0.5, "5"),
        ("final_drop_rate=0.5_seed=1", 0.5, 1, 0.375, 0.625, "5"),
        ("final_drop_rate=0_seed=0", 0.0, 0, 0.25, 0.75, "5"),
        ("final_drop_rate=0_seed=1", 0.0, 1, 0.125, 0.875, "5"),
    ]
    header = ["run", "model.final_drop_rate", "seed", "test_error", "test_accuracy",
              "test_error_at_best_val", "train_time_s", "steps"]  # fmt: skip
    lines = (tmp_path / "results.md").read_text().splitlines()
    md_rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    del md_rows[1]  # the |---| rule
    with open(tmp_path / "results.csv", newline="") as f:
        csv_rows = list(csv.reader(f))
    for table in (md_rows, csv_rows):  # model.depth is the same in every run: no column
        assert table[0] == header
        values = [(r[0], float(r[1]), int(r[2]), float(r[3]), float(r[4]), r[7]) for r in table[1:]]
        assert values == expected
    assert (tmp_path / "results.png").stat().st_size > 0
