"""Ratios between the benchmark's rows, and the performance targets they meet or miss.

Pure functions over the row dicts of `timing.run_jax` / `torch_peer.run_torch`: a row has
``framework`` (``"jax"`` / ``"torch"``), ``model``, ``setting`` and ``median_ms`` / ``mean_ms``.
Ratios are taken within one modifier group (``variant``): ``batch+scan+dp`` over
``constant+scan+dp``. A setting's ``@RATE`` is part of its group (``row_subset@0.4+scan`` over
``row@0.4+scan``); such a group has no constant row of its own and takes the one without the
rate (``constant+scan``). A PyTorch row carries its base setting's name with its ``@RATE`` (it
has no modifiers) and is the peer of every sdjax row with that base and rate.
"""

from __future__ import annotations

import statistics
from typing import Any

from experiments.benchmark.bench import macs, settings, transformer

# Upper limits of the measured ratios (median step over median step).
MAX_BATCH_OVER_CONSTANT = {"cifar_resnet110": 0.80}
MAX_ROW_OVERHEAD = 0.05  # masked row mode over constant depth, minus 1 (CIFAR ResNets)
MAX_JAX_OVER_TORCH = 1.0  # constant depth, every model with a PyTorch peer
MAX_ROW_SUBSET_OVER_CONSTANT = {"cifar_resnet110": 0.82}
MAX_ROW_SUBSET_OVER_ROW = {"efficientnet_b0": 1.0, transformer.NAME: 0.70}
MAX_COMPILE_S = {"cifar_resnet110": 20.0, "cifar_resnet1202": 60.0}


def find(rows: list[dict], framework: str, model: str, setting: str) -> dict | None:
    """The first row with this framework, model and setting name, or None."""
    for row in rows:
        if (row["framework"], row["model"], row["setting"]) == (framework, model, setting):
            return row
    return None


def ratio(a: dict | None, b: dict | None, key: str = "median_ms") -> float | None:
    """``a[key] / b[key]``, or None when either row (or its ``key``) is missing."""
    if a is None or b is None or key not in a or key not in b:
        return None
    return a[key] / b[key]


def variant(setting_name: str) -> str:
    """``"batch+scan+dp"`` -> ``"+scan+dp"``; ``"batch"`` -> ``""``; ``"row@0.4+scan"`` ->
    ``"@0.4+scan"``."""
    peer, _, rest = setting_name.partition("+")
    _, at, rate = peer.partition("@")
    return (f"@{rate}" if at else "") + (f"+{rest}" if rest else "")


def _minus_one(value: float | None) -> float | None:
    return None if value is None else value - 1.0


def _realized(row: dict | None) -> float | None:
    per_step = (row or {}).get("kept_block_compute_per_step")
    if not per_step or None in per_step:
        return None
    return statistics.fmean(per_step)


def summarize_models(rows: list[dict]) -> list[dict[str, Any]]:
    """Per model and modifier group: ideal vs measured batch-mode ratio, row-mode overhead,
    row-subset ratios, and sdjax / PyTorch per base setting.

    A group is listed when it has its constant row or at least two stochastic-depth rows;
    ratios whose rows are missing are None.
    """
    out = []
    groups = dict.fromkeys(
        (row["model"], variant(row["setting"])) for row in rows if row["framework"] == "jax"
    )
    for name, group in groups:
        rate = group.split("+")[0]  # "@0.4" or ""
        modifiers = group[len(rate) :]
        jax_rows = {s: find(rows, "jax", name, s + group) for s in settings.BASE_SETTINGS}
        torch_rows = {s: find(rows, "torch", name, s + rate) for s in settings.BASE_SETTINGS}
        sd_rows = [jax_rows[s] for s in settings.BASE_SETTINGS if s != "constant" and jax_rows[s]]
        if jax_rows["constant"] is None and len(sd_rows) < 2:
            continue
        jc, jr, js, jb = (jax_rows[s] for s in ("constant", "row", "row_subset", "batch"))
        tc, tr, ts, tb = (torch_rows[s] for s in ("constant", "row", "row_subset", "batch"))
        if rate:  # constant depth has no rate: the group's constant rows are the rate-less ones
            jc = find(rows, "jax", name, "constant" + modifiers)
            tc = find(rows, "torch", name, "constant")
        rates = next((r["block_drop_rates"] for r in sd_rows if r.get("block_drop_rates")), None)
        image_size = next(r["image_size"] for r in rows if r["model"] == name)
        out.append(
            {
                "model": name,
                "variant": group,
                "devices": (jc or sd_rows[0])["devices"],
                "ideal": macs.ideal_ratios(name, image_size, rates) if rates else None,
                "batch_over_constant_median": ratio(jb, jc),
                "batch_over_constant_mean": ratio(jb, jc, "mean_ms"),
                "row_overhead_median": _minus_one(ratio(jr, jc)),
                "row_subset_over_constant_median": ratio(js, jc),
                "row_subset_over_row_median": ratio(js, jr),
                "torch_batch_over_constant_median": ratio(tb, tc),
                "torch_batch_over_constant_mean": ratio(tb, tc, "mean_ms"),
                "torch_row_overhead_median": _minus_one(ratio(tr, tc)),
                "torch_row_subset_over_constant_median": ratio(ts, tc),
                "torch_row_subset_over_row_median": ratio(ts, tr),
                "torch_branches_run_fraction": (tb or {}).get("branches_run_fraction"),
                # Block compute kept by the gates the timed steps drew (MAC-weighted, as ideal).
                "realized_blocks": _realized(jb),
                "torch_realized_blocks": macs.torch_kept_block_compute(name, image_size, tb),
                "jax_over_torch_median": {
                    s: ratio(jax_rows[s], torch_rows[s]) for s in settings.BASE_SETTINGS
                },
            }
        )
    return out


def _target(name, value, limit, what, kind="ratio", strict=False) -> dict[str, Any]:
    met = value < limit if strict else value <= limit
    return {
        "target": name,
        "value": value,
        "limit": limit,
        "met": met,
        "what": what,
        "kind": kind,  # "ratio", "overhead" (a fraction above 1) or "seconds"
    }


def evaluate_targets(
    rows: list[dict], summary: list[dict], compile_rows: list[dict]
) -> list[dict[str, Any]]:
    """The targets (the ``MAX_*`` limits) that this run measured, each met or missed.

    Returns:
      One dict per measured target: ``target`` (its name, with the model and modifier group),
      ``value``, ``limit``, ``met``, ``what`` (how it was measured) and ``kind``.
    """
    targets = []
    for entry in summary:
        name = entry["model"]
        group = f"{name}, {entry['variant'] or 'no modifier'}"
        measured = [
            (
                "batch-mode step / constant-depth step",
                entry["batch_over_constant_median"],
                MAX_BATCH_OVER_CONSTANT.get(name),
                "ratio",
            ),
            (
                "row-subset step / constant-depth step",
                entry["row_subset_over_constant_median"],
                MAX_ROW_SUBSET_OVER_CONSTANT.get(name),
                "ratio",
            ),
            (
                "row-subset step / masked row-mode step",
                entry["row_subset_over_row_median"],
                MAX_ROW_SUBSET_OVER_ROW.get(name),
                "ratio",
            ),
            (
                "masked row-mode overhead over constant depth",
                entry["row_overhead_median"],
                MAX_ROW_OVERHEAD if name.startswith("cifar_resnet") else None,
                "overhead",
            ),
            (
                "sdjax constant-depth step / PyTorch eager step",
                entry["jax_over_torch_median"]["constant"],
                MAX_JAX_OVER_TORCH,
                "ratio",
            ),
        ]
        for title, value, limit, kind in measured:
            if value is None or limit is None:
                continue
            what = "median over median"
            if title.startswith("batch") and entry["realized_blocks"] is not None:
                what += (
                    f"; the timed steps kept {entry['realized_blocks']:.3f} of the block "
                    f"compute, expected {entry['ideal']['ideal_blocks']:.3f}"
                )
            # "Faster than masked row mode" (a limit of 1) is strict.
            strict = title.endswith("masked row-mode step") and limit == 1.0
            bound = f"< {limit:g}" if strict else f"<= {limit:g}"
            targets.append(_target(f"{title} {bound} ({group})", value, limit, what, kind, strict))
    for name, limit in MAX_COMPILE_S.items():
        candidates = [r for r in rows if r["framework"] == "jax" and r["model"] == name]
        what = "slowest lower+compile of the train step over this model's rows"
        if not candidates:
            candidates = [r for r in compile_rows if r["model"] == name]
            what = "lower+compile of the train step, scan_blocks=True"
        if candidates:
            worst = max(candidates, key=lambda r: r["lower_plus_compile_s"])
            targets.append(
                _target(
                    f"{name} compile <= {limit:.0f} s",
                    worst["lower_plus_compile_s"],
                    limit,
                    f"{what} (worst: {worst['setting']})",
                    "seconds",
                )
            )
    return targets
