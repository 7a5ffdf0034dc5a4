"""What a user sees from ``python -m sdjax.main`` when its output is not a terminal.

A run prints where it starts, then one line per epoch with the epoch, the train loss and
accuracy (and the evaluation's accuracy when it evaluated), and none of the libraries' start-up
chatter (JAX's TPU probe on a CPU host, TensorFlow's oneDNN notice, absl INFO lines). A bad
value is one line ``error: ...`` and nothing else.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=tests/tiny_config.py:steps=10,validation_size=1300"  # 4 steps per epoch


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdjax.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_progress_lines_show_epoch_loss_and_accuracy_and_no_startup_chatter(tmp_path):
    result = run_main(CONFIG, "--config.train.eval_every_epochs=2", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert lines[0].startswith("training 10 steps (4 per epoch) on 1 cpu device(s)"), lines
    epochs = [x for x in lines if x.startswith("epoch ")]
    assert [x.split()[1] for x in epochs] == ["1/3", "2/3", "3/3"]
    for line in epochs:
        assert re.search(r"train loss \d\.\d+ +train acc \d+\.\d\d% ", line), line
    # Evaluated at epoch 2 (eval_every_epochs) and at the last step, not at epoch 1.
    assert [("test acc" in x) for x in epochs] == [False, True, True]
    assert "val acc" in epochs[1]
    for chatter in ("Unable to initialize backend", "oneDNN custom operations", "InitializeLog"):
        assert chatter not in result.stderr
    assert not [x for x in lines if re.match(r"[IW]\d{4} ", x)], "absl INFO/WARNING lines"
    assert result.stdout.startswith("test_accuracy=")


def test_a_bad_value_is_one_error_line(tmp_path):
    result = run_main(CONFIG, "--config.optim.learning_rate=-1", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 1
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: config.optim.learning_rate=-1.0 is invalid")
