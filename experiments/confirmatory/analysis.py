"""The confirmatory study's analysis, as ``PLAN.md`` fixes it: paired by seed.

For each seed with both arms, ``d = error(arm) - error(constant)`` in percentage points; the
estimate is the mean of the ``d`` and its 95% t interval with ``n - 1`` degrees of freedom
(``experiments.common.stats.mean_ci`` of the differences). The decision rule (``decide``) is
the plans', applied to the primary endpoint (the test error at the best-validation epoch) of
the studies that have one (``DECIDED``: ``PLAN.md``'s primary study and the warm-up replication
of ``PLAN_warmup_confirm.md``), once every planned run is recorded; secondary studies get none.
"""

from __future__ import annotations

import collections
from typing import Any

from experiments import common
from experiments.common import stats

PAPER_GAIN_POINTS = 5.25 - 6.41
"""The paper's SD-minus-constant test error on full CIFAR-10 with ResNet-110 (points)."""
ENDPOINTS = {
    "test_error_at_best_val": "test error at the best-validation epoch (primary)",
    "test_error": "test error at the last epoch",
}
COMPARED = {
    "primary": ("sd", "primary"),
    "deep56": ("sd", "deep56"),
    "warmup": ("warmup", "primary"),
    "warmup_confirm": ("warmup", "warmup_confirm"),
}
"""study -> (the arm compared with constant depth, the study whose constant runs it pairs with)."""
DECIDED = {"primary": "stochastic depth", "warmup_confirm": "stochastic depth with warm-up"}
"""The studies whose plan states a decision rule -> the method the rule speaks of."""
PLANS = {"warmup_confirm": "PLAN_warmup_confirm.md"}
"""study -> its plan file beside this module (``PLAN.md`` where absent)."""


def decide(low: float, high: float, method: str = "stochastic depth") -> str:
    """The plans' rule for the 95% paired interval ``[low, high]`` of `method` minus constant
    depth (points)."""
    if high < 0:
        verdict = f"{method} lowers test error (interval below 0)"
    elif low > 0:
        verdict = f"{method} raises test error (interval above 0)"
    else:
        verdict = "inconclusive (interval contains 0)"
    if low <= PAPER_GAIN_POINTS <= high:
        return verdict + f"; consistent with the paper's {PAPER_GAIN_POINTS:+.2f}"
    return verdict + f"; excludes the paper's {PAPER_GAIN_POINTS:+.2f}"


def _paired_records(arm_runs, constant_runs):
    """``(arm record, constant record)`` for each seed that has both, in seed order."""
    by_seed = {r["seed"]: r for r in constant_runs}
    return [
        (r, by_seed[r["seed"]])
        for r in sorted(arm_runs, key=lambda r: r["seed"])
        if r["seed"] in by_seed
    ]


def _pairs(arm_runs, constant_runs, key):
    return [
        (a["seed"], 100 * c[key], 100 * a[key])
        for a, c in _paired_records(arm_runs, constant_runs)
        if a.get(key) is not None and c.get(key) is not None
    ]


def host(record: dict[str, Any]) -> str:
    """The machine a run's record names (at the run's end; a resumed run names only the last):
    the accelerator kind off CPU, else the CPU model and the ISA that picks its kernels."""
    devices = record.get("devices") or {}
    if devices.get("platform", "cpu") != "cpu":
        return f"{devices.get('device_kind', 'unknown')} ({devices['platform']})"
    mach = record.get("machine")
    if not mach:
        return "unknown"
    return f"{mach.get('cpu', 'unknown')} ({common.isa_text(mach.get('cpu_isa'))})"


def _hosts(arm_runs, constant_runs) -> dict[str, Any]:
    """How many paired runs each host ran, and the seeds whose two runs name different hosts."""
    paired = _paired_records(arm_runs, constant_runs)
    counts = collections.Counter(host(r) for pair in paired for r in pair)
    mixed = [a["seed"] for a, c in paired if host(a) != host(c)]
    return {"runs_per_host": dict(sorted(counts.items())), "mixed_seeds": mixed}


def analyse(study: str, records: dict[str, list[dict[str, Any]]], planned_runs: int) -> dict:
    """The study's result from the records of every study (``{study: [record, ...]}``)."""
    arm, base = COMPARED[study]
    arm_runs = [r for r in records.get(study, []) if r["arm"] == arm]
    constant_runs = [r for r in records.get(base, []) if r["arm"] == "constant"]
    own = len(records.get(study, []))
    result: dict[str, Any] = {
        "study": study,
        "arm": arm,
        "runs_recorded": own,
        "runs_planned": planned_runs,
        "analysis": "paired by seed: mean of per-seed differences, 95% t interval, n - 1 df",
        "endpoints": {},
    }
    for key, label in ENDPOINTS.items():
        pairs = _pairs(arm_runs, constant_runs, key)
        entry: dict[str, Any] = {"label": label, "pairs": pairs, "n": len(pairs)}
        if len(pairs) >= 2:
            ci = stats.mean_ci([a - c for _, c, a in pairs])
            low, high = stats.ci_bounds(ci)
            entry.update(mean_diff=ci["mean"], low=low, high=high, df=len(pairs) - 1)
            # The plans' rule: a decided study's primary endpoint only, never on partial data
            # (the secondary studies are reported without a decision).
            primary = key == "test_error_at_best_val"
            if study in DECIDED and primary and own == planned_runs:
                entry["decision"] = decide(low, high, DECIDED[study])
        result["endpoints"][key] = entry
    # Epoch times pair only runs that trained side by side, i.e. within one study; an arm paired
    # with another study's constant runs (warm-up) met other hosts and other loads.
    if base != study:
        result["time_note"] = (
            f"Epoch times are not compared: the constant runs are the {base} study's, trained "
            "in other sessions, on other hosts and loads."
        )
    elif len(times := _pairs(arm_runs, constant_runs, "median_epoch_time_s")) >= 2:
        ci = stats.mean_ci([a / c for _, c, a in times])  # the pairs are scaled by 100
        low, high = stats.ci_bounds(ci)
        result["median_epoch_time_ratio"] = {
            "n": len(times),
            "mean": ci["mean"],
            "low": low,
            "high": high,
        }
    result["hosts"] = _hosts(arm_runs, constant_runs)
    result["complete"] = own == planned_runs
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The study's table: per-seed errors and their paired differences, then the estimate."""
    arm = result["arm"]
    status = "complete" if result["complete"] else "PARTIAL"
    plan = PLANS.get(result["study"], "PLAN.md")
    lines = [
        f"# Confirmatory study `{result['study']}`: {arm} vs constant depth ({status}: "
        f"{result['runs_recorded']} of {result['runs_planned']} runs recorded)",
        "",
        f"Analysis: {result['analysis']} ({plan}). Errors in %, differences in points.",
    ]
    for entry in result["endpoints"].values():
        rows = [[seed, f"{c:.2f}", f"{a:.2f}", f"{a - c:+.2f}"] for seed, c, a in entry["pairs"]]
        lines += ["", f"## {entry['label']}", ""]
        lines.append(common.markdown_table(["seed", "constant", arm, "difference"], rows).strip())
        if "mean_diff" in entry:
            lines += [
                "",
                f"Mean difference **{entry['mean_diff']:+.2f}** points, 95% interval "
                f"[{entry['low']:+.2f}, {entry['high']:+.2f}] ({entry['n']} pairs, "
                f"{entry['df']} df).",
            ]
            if "decision" in entry:
                lines.append(f"Decision ({plan} rule): {entry['decision']}.")
    if "median_epoch_time_ratio" in result:
        t = result["median_epoch_time_ratio"]
        lines += [
            "",
            f"Median epoch time, {arm} / constant, paired: {t['mean']:.3f} "
            f"[{t['low']:.3f}, {t['high']:.3f}] ({t['n']} pairs).",
        ]
    if "time_note" in result:
        lines += ["", result["time_note"]]
    hosts = result["hosts"]
    if hosts["runs_per_host"]:
        counts = "; ".join(
            f"{name}: {n} run{'s' * (n != 1)}" for name, n in hosts["runs_per_host"].items()
        )
        mixed = hosts["mixed_seeds"]
        pairs = (
            "the two runs of every pair name one host"
            if not mixed
            else "the two runs of seed(s) " + ", ".join(map(str, mixed)) + " name different hosts"
        )
        lines += ["", f"Hosts of the paired runs, as their records name them: {counts}; {pairs}."]
    return "\n".join(lines)
