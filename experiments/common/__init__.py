"""Shared helpers of every study under `experiments/`: provenance, tables, and launching runs.

Every study writes `experiments/<study>/results/.../results.json` with a `provenance` block made by
`provenance()`: the exact command, the package versions, the git commit and the machine (CPU model
and ISA, `cpu_isa`). Training runs are launched one way: `train_command` builds the
`python -m sdjax.main` command line, `run_training` runs it in its workdir (or reads the finished
result), and `claim` lets several processes share one plan. Intervals are in
`experiments.common.stats`, timing loops in `experiments.common.timing`. The helpers here are pure
Python so that they can be tested in milliseconds; nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "ml-collections",
    "tensorflow-cpu",
    "matplotlib",
)


def command_line() -> str:
    """The command that started this process, as a reader would retype it from the repository root.

    `python -m experiments.x --flag` is reported as such (not as the absolute path of the module).
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name]
    else:
        head = ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def _cpuinfo_field(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo, or None (no such file or line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


# ISA name -> the /proc/cpuinfo flag that announces it, in increasing order of capability.
_ISA_FLAGS = (
    ("AVX2", "avx2"),
    ("AVX-512", "avx512f"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AMX", "amx_tile"),
)


def cpu_isa(flags: Iterable[str] | None = None) -> list[str]:
    """The vector/matrix extensions among AVX2, AVX-512 (F), AVX-512 BF16 and AMX (tile) the CPU
    announces: what decides which convolution kernels XLA and oneDNN can use.

    Args:
      flags: CPU feature flags as /proc/cpuinfo spells them (e.g. ``"avx512f"``); None reads
        this machine's (the first processor's ``flags`` line).

    Returns:
      The names present, in the order AVX2, AVX-512, AVX-512 BF16, AMX; ``[]`` when none is
      (or when the flags cannot be read, e.g. not Linux or not x86).
    """
    if flags is None:
        flags = (_cpuinfo_field("flags") or "").split()
    present = set(flags)
    return [name for name, flag in _ISA_FLAGS if flag in present]


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(packages: Iterable[str] = _PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` (missing ones are left out) and of Python."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    """The machine: OS, CPU model and ISA (`cpu_isa`), logical CPU count, and the JAX backend and
    devices if JAX is loaded."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
    }
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def provenance() -> dict[str, Any]:
    """Everything needed to say how a result was produced: command, versions, commit, machine, date."""
    return {
        "command": command_line(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "versions": versions(),
        "machine": machine(),
    }


def isa_text(isa: Sequence[str] | None) -> str:
    """``["AVX2", "AVX-512"]`` -> ``"AVX2, AVX-512"``; ``"no AVX2/AVX-512/AMX"`` when empty;
    ``"ISA unknown"`` for None (a record written before the ISA was recorded)."""
    if isa is None:
        return "ISA unknown"
    return ", ".join(isa) if isa else "no AVX2/AVX-512/AMX"


def provenance_markdown(prov: dict[str, Any]) -> str:
    """A short markdown block (for the bottom of a results table) from `provenance()`'s dict."""
    vers = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    mach = prov["machine"]
    lines = [
        f"- Command: `{prov['command']}`",
        f"- Date (UTC): {prov['date_utc']}; git commit: `{prov['git_commit']}`",
        f"- Versions: {vers}",
        f"- Machine: {mach['cpu']} ({isa_text(mach.get('cpu_isa'))}), {mach['cpu_count']} "
        f"logical CPUs, {mach['platform']}"
        + (f", JAX backend `{mach['jax_backend']}`" if "jax_backend" in mach else ""),
    ]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value). Empty input -> ValueError."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std: values is empty; need at least one value")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def format_mean_std(values: Sequence[float], *, scale: float = 1.0, digits: int = 2) -> str:
    """`"m ± s"` of `values * scale` with `digits` decimals, e.g. errors as percent with scale=100."""
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def pct(fraction: float | None, digits: int = 2) -> str:
    """A fraction as percent with `digits` decimals (``0.0525`` -> ``"5.25"``); ``"n/a"`` for
    None or NaN."""
    if fraction is None or math.isnan(fraction):
        return "n/a"
    return f"{100 * fraction:.{digits}f}"


def group_by_variant(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by their ``"variant"``, variants in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["variant"], []).append(run)
    return groups


def save_figure(fig: Any, path: str | os.PathLike, title: str | None = None) -> None:
    """Adds ``title`` (if any), lays out, writes ``fig`` as a 120-dpi PNG and closes it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (plotting only where a figure is made)

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are `str()`-ed, `|` escaped. Every row must match the headers."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(
                f"markdown_table: row {list(row)} has {len(row)} cells, expected {len(headers)}"
            )

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
    """Writes `obj` as indented JSON (creating parent folders); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def results_dir(
    default: str | os.PathLike, override: str | os.PathLike | None = None
) -> pathlib.Path:
    """`override` if given, else `default` (a study's `results/` folder), created if missing."""
    path = pathlib.Path(override) if override else pathlib.Path(default)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Training runs (through the command-line entry point, so every result has a retypable command)


def _flag_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return (
            "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    return str(value)


def train_command(
    config: str, workdir: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> list[str]:
    """The `python -m sdjax.main` command line for `config` (a path, optionally `:arg`).

    Args:
      config: e.g. `"configs/digits_sd.py"` or `"configs/digits_sd.py:model=cifar_resnet110"`.
      workdir: the run's working directory.
      overrides: dotted config paths -> values, passed as `--config.<path>=<value>` flags
        (tuples as `(a,b)`).

    Returns:
      The argument list, starting with `"python"` (replaced by `sys.executable` when run).
    """
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in (overrides or {}).items()]
    return ["python", "-m", "sdjax.main", f"--config={config}", f"--workdir={workdir}", *flags]


def run_training(
    command: Sequence[str],
    workdir: str | os.PathLike,
    *,
    env: dict[str, str] | None = None,
    result_path: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs `command` from the repository root unless its result file exists already.

    Every training run of every study is launched here: a `train_command` (sdjax) or another
    trainer's command line (the PyTorch reference). An interrupted sdjax run is resumed by the
    trainer itself (same command, same workdir).

    Args:
      command: the argument list, starting with `"python"` (replaced by `sys.executable`).
      workdir: the run's folder, created if missing.
      env: variables added to this process's environment (`TF_CPP_MIN_LOG_LEVEL=2` is set).
      result_path: the JSON file the command writes (default `workdir/results.json`).
      log_path: where its output goes, appended (default `workdir/log.txt`).

    Returns:
      The result file as a dict, with `"command"` set to the command line and `"reused"` telling
      whether an existing result was read.

    Raises:
      RuntimeError: the command failed (the message has the tail of the log).
    """
    workdir = pathlib.Path(workdir)
    results_path = pathlib.Path(result_path) if result_path else workdir / "results.json"
    log = pathlib.Path(log_path) if log_path else workdir / "log.txt"
    reused = results_path.exists()
    if not reused:
        for folder in (workdir, results_path.parent, log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, *command[1:]] if command[0] == "python" else list(command)
        run_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        with open(log, "a", encoding="utf-8") as out:
            proc = subprocess.run(
                argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=run_env
            )
        if proc.returncode != 0 or not results_path.exists():
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(
                f"run failed (exit {proc.returncode}): {shlex.join(command)}\n{tail}"
            )
    results = json.loads(results_path.read_text(encoding="utf-8"))
    results["command"] = shlex.join(command)
    results["reused"] = reused
    return results


def train_run(
    config: str, workdir: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Trains (or reads the finished) `train_command(config, workdir, overrides)`; its record.

    Returns:
      ``{"test_error", "test_accuracy", "train_time_s", "epoch_time_s" (steady, see
      `steady_epoch_time`), "final_train_loss", "steps", "command", "reused", "curves"
      (`epoch_curves`)}``; values the run's results.json lacks are None.
    """
    command = train_command(config, workdir, overrides)
    result = run_training(command, workdir)
    curves = epoch_curves(read_jsonl(pathlib.Path(workdir) / "metrics.jsonl"))
    return {
        "test_error": result.get("test_error"),
        "test_accuracy": result.get("test_accuracy"),
        "train_time_s": result.get("train_time_s"),
        "epoch_time_s": steady_epoch_time(curves["epoch_time_s"]),
        "final_train_loss": result.get("final_train_loss"),
        "steps": result.get("steps"),
        "command": result["command"],
        "reused": result["reused"],
        "curves": curves,
    }


def write_report(
    out_dir: str | os.PathLike, results: dict[str, Any], markdown: str, note: str = ""
) -> str:
    """Writes a study's `results.json` (`results`, with its ``"provenance"``) and `results.md`:
    `markdown`, then a Provenance section (`provenance_markdown`, then `note`). Returns the
    markdown written."""
    out_dir = pathlib.Path(out_dir)
    write_json(out_dir / "results.json", results)
    md = (
        markdown.rstrip("\n")
        + "\n\n## Provenance\n\n"
        + provenance_markdown(results["provenance"])
        + note
    )
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    return md


def committed_runs(out_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict | None]:
    """The `runs` of a study's committed `out_dir/results.json` and the provenance of the call
    that recorded them (its `runs_provenance` if it was itself regenerated, else `provenance`);
    `([], None)` without the file. What a study's `--aggregate_only` regenerates its tables from
    when the runs' workdirs are gone."""
    path = pathlib.Path(out_dir) / "results.json"
    if not path.exists():
        return [], None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved.get("runs", []), saved.get("runs_provenance", saved.get("provenance"))


def find_run(
    runs: Sequence[dict[str, Any]], variant: str, seed: int, planned: Sequence[str]
) -> dict[str, Any] | None:
    """The run of (`variant`, `seed`) whose `command` is `planned` up to `--workdir`, or None."""

    def key(argv: Sequence[str]) -> list[str]:
        return [a for a in argv if not a.startswith("--workdir=")]

    for run in runs:
        if (run["variant"], run["seed"]) == (variant, seed) and key(
            shlex.split(run["command"])
        ) == key(planned):
            return run
    return None


def claim(workdir: str | os.PathLike) -> bool:
    """Takes `workdir` for this process; False while another live process holds it.

    Several processes given the same plan (one per core) share its runs this way: each trains
    the runs it claims first (`run_training` after a True). A claim (`claim.pid` in the
    workdir) whose process has died is taken over (the run resumes from its checkpoint); the
    caller removes the file when the run has finished.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "claim.pid"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text(encoding="utf-8") or "0")
                if pid == os.getpid():
                    return True
                os.kill(pid, 0)
                return False  # held by a live process
            except (ValueError, ProcessLookupError):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                return False  # a live process of another user
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        return True
    return False


def epoch_curves(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch curves from a trainer's metrics.jsonl records (see `read_jsonl`).

    Records with `train_loss` cover the steps since the previous such record (the trainer logs
    means), so the training loss of epoch e is the step-weighted mean over the records in
    `((e-1) * S, e * S]`, S = steps per epoch (from the evaluation records: `step / epoch`). A resumed
    run may repeat steps; the last record for a step wins.

    Returns:
      `{"epoch", "test_error", "test_loss"}` at the evaluated epochs, and `{"train_epoch",
      "train_loss", "epoch_time_s"}` for every completed epoch (`epoch_time_s` may be shorter than
      `train_epoch` if times were not logged). Empty lists when there is no evaluation record.
    """
    by_step: dict[tuple[int, str], dict[str, Any]] = {}
    for r in records:
        kind = "train" if "train_loss" in r else "eval" if "test_accuracy" in r else "time"
        if kind == "time" and "epoch_time_s" not in r:
            continue
        by_step[(int(r["step"]), kind)] = r
    evals = sorted((r for (s, k), r in by_step.items() if k == "eval"), key=lambda r: r["step"])
    out: dict[str, list[float]] = {
        k: []
        for k in ("epoch", "test_error", "test_loss", "train_epoch", "train_loss", "epoch_time_s")
    }
    if not evals:
        return out
    steps_per_epoch = evals[0]["step"] / evals[0]["epoch"]
    for r in evals:
        out["epoch"].append(float(r["epoch"]))
        out["test_error"].append(1.0 - float(r["test_accuracy"]))
        out["test_loss"].append(float(r.get("test_loss", float("nan"))))
    trains = sorted((r for (s, k), r in by_step.items() if k == "train"), key=lambda r: r["step"])
    sums: dict[int, list[float]] = {}
    prev_step = 0
    for r in trains:
        step = int(r["step"])
        epoch = max(1, math.ceil(step / steps_per_epoch - 1e-9))
        weight = step - prev_step
        prev_step = step
        acc = sums.setdefault(epoch, [0.0, 0.0])
        acc[0] += weight * float(r["train_loss"])
        acc[1] += weight
    for epoch in sorted(sums):
        if sums[epoch][1] > 0:
            out["train_epoch"].append(float(epoch))
            out["train_loss"].append(sums[epoch][0] / sums[epoch][1])
    times = sorted((r for (s, k), r in by_step.items() if k == "time"), key=lambda r: r["step"])
    out["epoch_time_s"] = [float(r["epoch_time_s"]) for r in times]
    return out


def steady_epoch_time(epoch_times: Sequence[float]) -> float | None:
    """Median epoch time without the first epoch (which includes compilation); None if no epochs."""
    times = list(epoch_times[1:]) or list(epoch_times)
    if not times:
        return None
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
