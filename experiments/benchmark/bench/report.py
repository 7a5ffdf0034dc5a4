"""The benchmark's markdown report, rendered from its JSON report dict (`render_markdown`)."""

from __future__ import annotations

from typing import Any

from experiments import common
from experiments.benchmark.bench import analysis


def fmt(value: float | None, spec: str = ".1f") -> str:
    """``format(value, spec)``, or ``"n/a"`` for None."""
    return "n/a" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    """A signed percentage with one decimal (``0.031`` -> ``"+3.1%"``), or ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def input_text(row: dict[str, Any]) -> str:
    """``"32x32x3"``: the per-example input shape of a row."""
    shape = row.get("input_shape") or [row["image_size"], row["image_size"], 3]
    return "x".join(str(d) for d in shape)


def _header(report: dict[str, Any]) -> list[str]:
    prov, extra, config = report["provenance"], report["machine_extra"], report["config"]
    mach = prov["machine"]
    rows = report["rows"]
    malloc = (
        "glibc set to reuse freed memory (`sdjax.host_malloc`, as the trainer does on CPU; "
        "it applies to the PyTorch rows of this process too)"
        if extra.get("host_malloc_applied")
        else "glibc defaults"
    )
    faults = ", ".join(
        f"{r['model']} {r['setting']} {r['page_faults_per_step']:.0f} / "
        f"{r['system_cpu_ms_per_step']:.0f}"
        for r in rows
        if r["framework"] == "jax" and "page_faults_per_step" in r
    )
    return [
        "# sdjax train-step benchmark",
        "",
        "Produced by `experiments/benchmark/benchmark.py` in one process run; see its docstring for the "
        "definitions. Times are per training step of `sdjax.steps.train_step` (forward, "
        "backward, SGD-Nesterov update, BN statistics update), synthetic data, float32 unless "
        "stated.",
        "",
        common.provenance_markdown(prov).rstrip("\n"),
        f"- CPUs available to this process: {extra['cpus_available']}; JAX devices: "
        f"{mach.get('jax_devices')}",
        f"- PyTorch: {report['torch_status']}",
        f"- Host allocator (`--host_malloc {config.get('host_malloc', 'auto')}`): {malloc}; "
        f"median page faults / system CPU ms per sdjax step: {faults}",
        f"- Load average at start / end: {extra['loadavg_start']} / {extra['loadavg_end']}",
        f"- Steps: {config['warmup']} warm-up + {config['steps']} timed"
        + (
            f", the sdjax rows interleaved in {config['rounds']} rounds"
            if config.get("rounds", 1) > 1
            else ", row after row"
        )
        + "; stochastic depth: "
        f"{config['drop_schedule']} to {config['final_drop_rate']} (a setting `BASE@RATE`: to "
        "RATE; the transformer MLP stack: its own rate, see the rows' block_drop_rates); sdjax "
        "compute dtype "
        f"{config['dtype'] or 'float32'} (PyTorch: float32)",
        "",
    ]


def step_table(rows: list[dict]) -> str:
    """One line per sdjax row with its PyTorch peer (the row of its base setting)."""
    headers = [
        "model",
        "setting",
        "batch",
        "input",
        "devices",
        "compile s",
        "median ms",
        "mean ms",
        "min-max ms",
        "PyTorch median ms",
        "PyTorch mean ms",
        "sdjax / PyTorch",
    ]
    table = []
    for row in rows:
        if row["framework"] != "jax":
            continue
        peer = analysis.find(rows, "torch", row["model"], row["setting"].split("+")[0])
        table.append(
            [
                row["model"],
                row["setting"],
                row["batch_size"],
                input_text(row),
                row["devices"],
                fmt(row["lower_plus_compile_s"]),
                fmt(row["median_ms"]),
                fmt(row["mean_ms"]),
                f"{row['min_ms']:.0f}-{row['max_ms']:.0f}",
                fmt(peer and peer["median_ms"]),
                fmt(peer and peer["mean_ms"]),
                fmt(analysis.ratio(row, peer), ".2f"),
            ]
        )
    return common.markdown_table(headers, table)


def stochastic_depth_table(summary: list[dict]) -> str:
    """One line per model and modifier group that has stochastic-depth rows."""
    headers = [
        "model",
        "modifiers",
        "ideal batch/const (block MACs)",
        "ideal batch/const (step MACs)",
        "realized kept (block MACs): sdjax / PyTorch",
        "sdjax batch/const median",
        "sdjax batch/const mean",
        "PyTorch batch/const median",
        "sdjax row overhead",
        "PyTorch row overhead",
        "sdjax row-subset/const",
        "sdjax row-subset/row",
        "PyTorch row-subset/row",
    ]
    ratio_keys = (
        "batch_over_constant_median",
        "row_overhead_median",
        "row_subset_over_constant_median",
        "row_subset_over_row_median",
    )
    table = []
    for entry in summary:
        if all(entry[k] is None for k in ratio_keys):
            continue  # a group without stochastic-depth rows (e.g. one extra constant row)
        ideal = entry["ideal"] or {}
        table.append(
            [
                entry["model"],
                entry["variant"] or "none",
                fmt(ideal.get("ideal_blocks"), ".3f"),
                fmt(ideal.get("ideal_step"), ".3f"),
                f"{fmt(entry['realized_blocks'], '.3f')} / "
                f"{fmt(entry['torch_realized_blocks'], '.3f')}",
                fmt(entry["batch_over_constant_median"], ".3f"),
                fmt(entry["batch_over_constant_mean"], ".3f"),
                fmt(entry["torch_batch_over_constant_median"], ".3f"),
                pct(entry["row_overhead_median"]),
                pct(entry["torch_row_overhead_median"]),
                fmt(entry["row_subset_over_constant_median"], ".3f"),
                fmt(entry["row_subset_over_row_median"], ".3f"),
                fmt(entry["torch_row_subset_over_row_median"], ".3f"),
            ]
        )
    return common.markdown_table(headers, table)


def target_value(target: dict[str, Any]) -> str:
    """A target's measured value as the table shows it, by its kind."""
    if target["kind"] == "seconds":
        return f"{target['value']:.2f} s"
    if target["kind"] == "overhead":
        return pct(target["value"])
    return f"{target['value']:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report: header, step times, stochastic-depth ratios, compile-only rows,
    targets."""
    lines = _header(report)
    rows, summary = report["rows"], report["summary"]
    lines += ["## Step times", ""]
    num_devices = max((r.get("devices", 1) for r in rows), default=1)
    if num_devices > 1:
        lines += [
            f"This process had {num_devices} devices. Rows without `+dp` ran on one of them; on "
            "XLA:CPU they may be slower than the same rows in a one-device process (see the "
            "`--cpu_devices` flag in the script's docstring).",
            "",
        ]
    lines.append(step_table(rows))
    lines += ["## Stochastic depth: ideal vs measured", "", stochastic_depth_table(summary)]
    if report["compile_only"]:
        lines += ["## Compile only", ""]
        headers = ["model", "setting", "batch", "input", "lower s", "compile s", "total s"]
        table = [
            [
                r["model"],
                r["setting"],
                r["batch_size"],
                input_text(r),
                fmt(r["lower_s"]),
                fmt(r["compile_s"]),
                fmt(r["lower_plus_compile_s"]),
            ]
            for r in report["compile_only"]
        ]
        lines.append(common.markdown_table(headers, table))
    lines += ["## Targets", ""]
    if report["targets"]:
        table = [
            [t["target"], target_value(t), "met" if t["met"] else "missed", t["what"]]
            for t in report["targets"]
        ]
        lines.append(common.markdown_table(["target", "measured", "verdict", "measured as"], table))
    else:
        lines.append("No target was measured by this run.\n")
    lines += [
        "Ideal ratio: expected fraction of multiply-accumulates kept in batch mode, "
        "`sum_l w_l (1 - r_l) / sum_l w_l` over residual blocks (`w_l`: analytic MACs of block "
        "l's branch, `r_l`: its drop rate); the step column also counts the stem and head, "
        "which are never dropped. Batch-mode times vary with the random gates; every run uses "
        "the same key sequence. Realized kept: the same fraction for the gates the timed steps "
        "drew (sdjax / PyTorch), averaged over those steps. Row-subset mode runs each branch on "
        "a fixed fraction of the samples, so its ideal is the same expectation without the "
        "step-to-step variation.",
        "",
    ]
    return "\n".join(lines)
