"""Metric writing: ``workdir/metrics.jsonl``, TensorBoard event files and a progress display.

Every ``write_scalars(step, {...})`` call appends one JSON object ``{"step": ..., name: value}``
to ``metrics.jsonl`` (flushed at once, so a killed run keeps its log) and writes the same scalars
to TensorBoard under ``workdir/tensorboard``. Only process 0 writes.

``metrics.jsonl`` is the run's log of record. A run that resumes from the checkpoint at step
``S`` first drops every record with a step after ``S`` (written after that checkpoint by the
interrupted run, and about to be written again) and rebuilds the TensorBoard events from the
records it keeps, so that both hold each step once, as an uninterrupted run writes them.

TensorBoard events need clu (and through it TensorFlow), imported only when they are written:
with ``tensorboard=False`` (``config.train.tensorboard``), or where clu is not installed (a
logged warning), only ``metrics.jsonl`` is written and neither is imported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from absl import logging

__all__ = ["JsonlWriter", "ProgressBar", "create_writer", "truncate_records"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class _NullWriter:
    """clu's ``MetricWriter`` methods, each writing nothing (processes other than 0; the base of
    :class:`JsonlWriter`, which writes scalars only). clu is not imported."""

    def write_scalars(self, step, scalars):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlWriter(_NullWriter):
    """Appends each ``write_scalars`` call to ``path`` as one JSON line (flushed at once)."""

    def __init__(self, path: str):
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_records(path: str, last_step: int) -> list[dict[str, Any]]:
    """Keeps the records of ``path`` with ``step <= last_step`` (rewritten atomically).

    A line cut short by a kill (not valid JSON) is dropped with everything after it. Returns the
    records kept; a missing file is no records.
    """
    kept = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return kept
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if int(record["step"]) <= last_step:
            kept.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


def create_writer(
    workdir: str, is_main_process: bool, start_step: int, tensorboard: bool = True
) -> Any:
    """TensorBoard + JSON lines on the main process, nothing elsewhere.

    ``start_step`` is the step the run starts (resumes) at: records after it are dropped from
    ``metrics.jsonl`` and the TensorBoard events are rewritten from the records kept.
    ``tensorboard=False``, or clu not installed, writes JSON lines only (no clu, no TensorFlow).
    """
    if not is_main_process:
        return _NullWriter()
    path = os.path.join(workdir, METRICS_FILE)
    kept = truncate_records(path, start_step)
    if not tensorboard:
        return JsonlWriter(path)
    try:
        from clu import metric_writers  # noqa: PLC0415 (imports TensorFlow)
    except ImportError as e:
        logging.warning("no TensorBoard events (%s); metrics.jsonl only", e)
        return JsonlWriter(path)
    events = os.path.join(workdir, TENSORBOARD_DIR)
    shutil.rmtree(events, ignore_errors=True)
    summary = metric_writers.SummaryWriter(events)
    for record in kept:
        step = record.pop("step")
        summary.write_scalars(step, {k: v for k, v in record.items() if not isinstance(v, str)})
    return metric_writers.MultiWriter([summary, JsonlWriter(path)])


def _format(name: str, value: float) -> str:
    if name.endswith("accuracy"):
        return f"{name.replace('_accuracy', ' acc')} {100 * value:.2f}%"
    return f"{name.replace('_', ' ')} {value:.4g}"


class ProgressBar:
    """Progress of a run: a tqdm bar on a terminal, else one line per epoch on stderr.

    The line reads e.g. ``epoch 5/20  step 110/440  train loss 0.408  train acc 86.25%  test
    acc 79.44%  1.0 s/epoch``. ``enabled=False``: no bar, only the lines; ``show=False`` (processes
    other than 0): nothing.
    """

    def __init__(
        self, total: int, initial: int, steps_per_epoch: int, enabled: bool = True, show=True
    ):
        self._total, self._spe, self._show = total, steps_per_epoch, show
        self._bar = None
        if show and enabled and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def _epochs(self) -> str:
        return f"{math.ceil(self._total / self._spe)}"

    def message(self, text: str) -> None:
        """A line of text above the bar (or on its own); nothing when ``show`` is False."""
        if not self._show:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, step: int, **postfix: Any) -> None:
        """Moves the bar to ``step`` showing ``postfix`` (a terminal only)."""
        if self._bar is not None:
            self._bar.n = step
            epoch = f"{math.ceil(step / self._spe)}/{self._epochs()}"
            shown = {"epoch": epoch, **{k: f"{v:.4g}" for k, v in postfix.items()}}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()

    def epoch_end(self, step: int, scalars: Mapping[str, float], seconds: float) -> None:
        """The line for the epoch that ends at ``step``: ``scalars`` as losses and accuracies."""
        parts = [f"epoch {math.ceil(step / self._spe)}/{self._epochs()}"]
        parts.append(f"step {step}/{self._total}")
        parts += [_format(k, float(v)) for k, v in scalars.items()]
        parts.append(f"{seconds:.1f} s/epoch")
        self.message("  ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
