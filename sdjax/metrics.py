"""Metric writing: TensorBoard event files + ``workdir/metrics.jsonl`` (clu metric writers).

Every ``write_scalars(step, {...})`` call appends one JSON object ``{"step": ..., name: value}``
to ``metrics.jsonl`` (flushed at once, so a killed run keeps its log) and writes the same scalars
to TensorBoard under ``workdir/tensorboard``. Only process 0 writes; other hosts only log.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from clu import metric_writers
from clu.metric_writers import interface

__all__ = ["JsonlWriter", "ProgressBar", "create_writer"]


def _to_python(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class JsonlWriter(interface.MetricWriter):
    """A clu ``MetricWriter`` that appends scalars as JSON lines to ``path``."""

    def __init__(self, path: str):
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def create_writer(workdir: str, is_main_process: bool) -> interface.MetricWriter:
    """TensorBoard + JSON lines + logging on the main process; logging only elsewhere."""
    if not is_main_process:
        return metric_writers.LoggingWriter()
    return metric_writers.MultiWriter(
        [
            metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
            metric_writers.LoggingWriter(),
        ]
    )


class ProgressBar:
    """A tqdm progress bar over steps, shown only when stderr is an interactive terminal."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.n = step
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
