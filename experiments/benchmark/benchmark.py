"""Train-step benchmark: compile time and step time of sdjax models, with stochastic depth, vs PyTorch.

One process, one run, every figure side by side. For each model and setting it builds the model,
jit-compiles the package's training step (`sdjax.steps.train_step`: forward in train mode,
softmax cross-entropy, backward, SGD with Nesterov momentum and weight decay, BatchNorm
statistics update), times `lower` + `compile`, then times ``--steps`` steps after ``--warmup``
untimed ones. When torch is importable (the ``bench`` extra) the same network in PyTorch eager
(`experiments/reference/torch_models.py`; the ViTs: `experiments.benchmark.bench.torch_peer`) is
timed right after, in the same process, on the same synthetic batch, with the same optimizer. The parts live in `experiments/benchmark/bench/` (settings, timing, MACs,
analysis, report).

Settings (``--settings``; extra rows for single models with ``--extra MODEL:SETTING``):

* ``constant``: constant depth (``final_drop_rate=0``).
* ``row``: per-sample masked drop path (``drop_mode="row"``), ``--drop_schedule`` to
  ``--final_drop_rate`` (default: linear to 0.5). PyTorch peer: timm-style DropPath.
* ``row_subset``: the branch runs on a fixed-size random subset of the samples
  (``drop_mode="row_subset"``; the run stops with a message if the installed sdjax lacks the
  mode). PyTorch peer: DINOv2's subset residual.
* ``batch``: one gate per block and step, a dropped branch is not computed
  (``drop_mode="batch"``). PyTorch peer: the paper's ``if rand < drop: skip`` in Python.
* modifiers appended with ``+``: ``+xla`` / ``+fast`` (``conv_impl``), ``+scan``
  (``scan_blocks=True``, the models' default), ``+unrolled`` (``scan_blocks=False``), ``+dp``
  (data-parallel: the batch sharded over the trainer's mesh, `sdjax.runtime.create_mesh`,
  parameters replicated; on CPU the device count is ``--cpu_devices``; ``row_subset`` rows
  draw one subset per device, ``drop_shards`` = the device count).
  Rows with modifiers are JAX-only; their PyTorch ratio uses the peer of the
  base setting. Ratios between settings are taken within one modifier group.
* a drop rate appended to the base with ``@`` (not on ``constant``): ``row@0.1``,
  ``row_subset@0.4+scan`` train to that rate instead of ``--final_drop_rate``; the PyTorch peer
  runs once per base and rate, and ratios are taken within one rate (the constant row of a
  rate group is the one without a rate, e.g. ``row_subset@0.4 / row@0.4`` and
  ``row_subset@0.4 / constant``).

Workloads: CIFAR ResNets take ``--batch_size`` images of ``--image_size``; EfficientNets
``--efficientnet_batch_size`` of ``--efficientnet_image_size``. ``transformer_mlp_stack`` is 12
pre-norm transformer MLP blocks (LayerNorm, width 384, hidden 4 x 384, 64 tokens, batch 64,
uniform drop rate 0.4), each residual an `sdjax.layers.DropPathResidual`, timed in the settings
``--transformer_settings`` (``+dp`` is its only modifier). ViTs (``vit_s16``, DeiT-S; also
``vit_ti16``, ``vit_b16``) take ``--vit_batch_size`` (16) images of ``--vit_image_size`` (224)
with 1000 classes, timed in the settings ``--vit_settings`` (default: constant, masked row and
row subset at DeiT's rate 0.1 and DINOv2's 0.4, on ``--drop_schedule``: linear is timm's
``linspace(0, rate, 12)``), with drop path on the attention and on the MLP branch of each
block; their PyTorch peer is a plain-PyTorch ViT with timm's DropPath / DINOv2's subset residual
on both branches (`experiments.benchmark.bench.torch_peer`).

CPU devices: ``--cpu_devices N`` (default: the CPU cores available to the process) splits the
CPU backend into N devices before JAX initializes. Rows without ``+dp`` run on device 0 only;
with N > 1, XLA:CPU may run them slower than a one-device process would, so for one-device
figures use ``--cpu_devices 1``.

Host allocator: ``--host_malloc`` (default ``auto``) applies `sdjax.host_malloc` to the process,
as the trainer's entry point does (it applies to the PyTorch rows too; ``system`` keeps glibc's
defaults). The median page faults and system CPU time per sdjax step are recorded for every row.

Randomness: every model and setting gets the same key sequence (see `experiments.benchmark.bench.timing`),
so batch-mode runs see the same gates run after run; PyTorch reseeds its generator the same way
before each run. Batch-mode step times vary with the gates, hence both median and mean, and the
realized kept compute of the timed steps' gates beside the expected one (`experiments.benchmark.bench.macs`).

Usage (from the repository root)::

    python -m experiments.benchmark.benchmark                 # the full run
    python -m experiments.benchmark.benchmark --quick         # cifar_resnet20, batch 16, 3 steps (seconds)
    python -m experiments.benchmark.benchmark --models cifar_resnet56 --settings constant,batch --no_torch
    python -m experiments.benchmark.benchmark --models vit_s16 --vit_batch_size 16   # the ViT rows

Writes ``<out_dir>/benchmark.json`` and ``<out_dir>/benchmark.md`` (default
``experiments/benchmark/results/``), both with the exact command, versions and machine (CPU model and
ISA). The targets (`experiments.benchmark.bench.analysis`) are reported as met / missed. This is a
measurement script, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` and `sdjax` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax

from experiments import common
from experiments.benchmark.bench import analysis, report, settings, timing, transformer
from sdjax import host_malloc, runtime, schedules

try:  # the `bench` extra
    import torch

    from experiments.benchmark.bench import torch_peer

    TORCH_IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the environment
    torch = torch_peer = None
    TORCH_IMPORT_ERROR = f"{type(error).__name__}: {error}"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of ``--quick`` or of the full run filled in.

    Every setting, model and the plan's models are checked here (unknown names, modes the
    installed sdjax lacks): errors exit with status 2 before anything compiles.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated model names (default: {','.join(settings.DEFAULT_MODELS)}; "
        "--quick: cifar_resnet20)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated settings for every sdjax model: "
        "constant|row|row_subset|batch[+xla|+fast|+scan|+dp] "
        f"(default: {','.join(settings.DEFAULT_SETTINGS)}; "
        f"--quick: {','.join(settings.QUICK_SETTINGS)})",
    )
    parser.add_argument(
        "--transformer_settings",
        default=",".join(settings.TRANSFORMER_SETTINGS),
        help=f"settings of {transformer.NAME} (modifier: +dp only)",
    )
    parser.add_argument(
        "--vit_settings",
        default=",".join(settings.VIT_SETTINGS),
        help="settings of the ViTs (vit_*), BASE[@RATE][+modifiers]",
    )
    parser.add_argument(
        "--extra",
        default=None,
        help="comma-separated MODEL:SETTING extra rows (default: "
        f"{','.join(settings.DEFAULT_EXTRA)}; --quick: none); models not in --models are "
        "skipped",
    )
    parser.add_argument(
        "--compile_only_models",
        default=None,
        help="comma-separated models compiled (scan_blocks=True, constant depth) but not timed "
        f"(default: {','.join(settings.DEFAULT_COMPILE_ONLY)}; --quick: none)",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="CIFAR ResNets (default 128)")
    parser.add_argument("--image_size", type=int, default=32, help="CIFAR ResNets (default 32)")
    parser.add_argument("--efficientnet_batch_size", type=int, default=32)
    parser.add_argument("--efficientnet_image_size", type=int, default=64)
    parser.add_argument("--vit_batch_size", type=int, default=16, help="ViTs (default 16)")
    parser.add_argument(
        "--vit_image_size", type=int, default=224, help="ViTs, a multiple of 16 (default 224)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="> 1: compile every sdjax row first, then time their steps interleaved in this many "
        "rounds of steps / rounds each (a drifting host then affects every row alike); "
        "--steps must be a multiple. The PyTorch rows follow, one after another.",
    )
    parser.add_argument("--final_drop_rate", type=float, default=0.5)
    parser.add_argument("--drop_schedule", default="linear", choices=sorted(schedules.SCHEDULES))
    parser.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prng_impl",
        default="threefry2x32",
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        help="JAX PRNG implementation of the step keys (stochastic-depth gates)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: cifar_resnet20, batch 16, 1 warm-up + 3 steps, nothing extra",
    )
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch column")
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=None,
        help="split the CPU backend into this many devices for the +dp rows (default: the CPU "
        "cores available to the process; no effect on GPU/TPU devices)",
    )
    parser.add_argument(
        "--host_malloc",
        choices=host_malloc.MODES,
        default="auto",
        help="host allocator setting of the process (sdjax.host_malloc; default auto: buffers "
        "reused across steps on CPU, as python -m sdjax.main does; system: glibc's defaults)",
    )
    parser.add_argument(
        "--out_dir", default=str(pathlib.Path(__file__).resolve().parent / "results")
    )
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = {
        "models": "cifar_resnet20" if quick else ",".join(settings.DEFAULT_MODELS),
        "settings": ",".join(settings.QUICK_SETTINGS if quick else settings.DEFAULT_SETTINGS),
        "extra": "" if quick else ",".join(settings.DEFAULT_EXTRA),
        "compile_only_models": "" if quick else ",".join(settings.DEFAULT_COMPILE_ONLY),
        "batch_size": 16 if quick else 128,
        "steps": 3 if quick else 20,
        "warmup": 1 if quick else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.rounds < 1 or args.steps % args.rounds:
        parser.error(f"--rounds={args.rounds} must be >= 1 and divide --steps={args.steps}")
    if args.cpu_devices is None:
        args.cpu_devices = available_cpus()
    if args.cpu_devices < 1:
        parser.error(f"--cpu_devices must be >= 1, got {args.cpu_devices}")
    for name in _csv(args.models) + _csv(args.compile_only_models):
        if name not in settings.model_names():
            parser.error(
                f"unknown model {name!r}; valid names: {', '.join(settings.model_names())}"
            )
    try:
        for name, setting in plan(args):
            settings.build_model(name, setting, args.dtype)
    except ValueError as error:
        parser.error(str(error))
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, settings.Setting]]:
    """``(model, setting)`` pairs to time, a model's rows together, in ``--models`` order.

    Raises:
      ValueError: an unknown setting base or modifier.
    """
    names = _csv(args.models)
    pairs = []
    for name in names:
        wl = settings.workload(name, args)
        if name == transformer.NAME:
            chosen = args.transformer_settings
        elif settings.is_vit(name):
            chosen = args.vit_settings
        else:
            chosen = args.settings
        pairs += [(name, wl.setting(s)) for s in _csv(chosen)]
    for item in _csv(args.extra):
        name, _, setting_name = item.partition(":")
        if name in names and all((name, setting_name) != (n, s.name) for n, s in pairs):
            pairs.append((name, settings.workload(name, args).setting(setting_name)))
    pairs.sort(key=lambda pair: names.index(pair[0]))
    return pairs


def available_cpus() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _torch_status(args: argparse.Namespace, cpus: int) -> str:
    if args.no_torch:
        return "skipped (--no_torch)"
    if torch is None:
        return f"skipped (torch not importable: {TORCH_IMPORT_ERROR})"
    torch.set_num_threads(cpus)
    status = f"torch {torch.__version__}, eager on CPU, {torch.get_num_threads()} threads"
    if jax.default_backend() != "cpu":
        status += f" (sdjax runs on {jax.default_backend()}: the ratio compares devices)"
    return status


def _log(row: dict[str, Any]) -> None:
    text = f"[benchmark] {row['framework']:5s} {row['model']:22s} {row['setting']:18s}"
    if "lower_plus_compile_s" in row:
        text += f" compile {row['lower_plus_compile_s']:6.1f} s"
    if "median_ms" in row:
        text += f"  median {row['median_ms']:8.1f} ms  mean {row['mean_ms']:8.1f} ms"
    print(text, flush=True)


def _interleaved_jax_rows(pairs, args) -> dict[tuple[str, str], dict[str, Any]]:
    """Every sdjax row of ``pairs``, compiled first and then timed in ``args.rounds`` rounds
    (after each row's warm-up, each round runs ``steps / rounds`` steps of every row in turn)."""
    prepared = []
    for name, setting in pairs:
        wl = settings.workload(name, args)
        row, model, runner = timing.prepare_jax(name, setting, wl, args)
        runner.run(args.warmup)
        prepared.append((name, setting, wl, row, model, runner))
    for _ in range(args.rounds):
        for *_, runner in prepared:
            runner.run(args.steps // args.rounds)
    out = {}
    for name, setting, wl, row, model, runner in prepared:
        row["rounds"] = args.rounds
        out[(name, setting.name)] = runner.finish(row, name, model, wl, args)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; writes and returns the JSON report."""
    args = parse_args(argv)
    loadavg_start = os.getloadavg()
    cpus = available_cpus()
    malloc_applied = host_malloc.configure(args.host_malloc)
    # Called from Python after JAX started (e.g. by a test), the existing devices are kept.
    runtime.request_cpu_devices(args.cpu_devices)
    num_devices = len(jax.devices())
    pairs = plan(args)
    for name, setting in pairs:
        batch = settings.workload(name, args).batch_size
        if setting.data_parallel and batch % num_devices:
            raise SystemExit(
                f"error: {name} {setting.name}: batch size {batch} is not divisible by the "
                f"{num_devices} devices of the data-parallel rows; change the batch size or "
                "--cpu_devices"
            )
    torch_status = _torch_status(args, cpus)
    print(f"[benchmark] PyTorch column: {torch_status}", flush=True)

    rows: list[dict[str, Any]] = []
    jax_rows = _interleaved_jax_rows(pairs, args) if args.rounds > 1 else {}
    for name, setting in pairs:
        wl = settings.workload(name, args)
        row = jax_rows.pop((name, setting.name), None) or timing.run_jax(name, setting, wl, args)
        rows.append(row)
        _log(row)
        gc.collect()
        if (
            torch_status.startswith("torch ")
            and name in torch_peer.available()
            and analysis.find(rows, "torch", name, setting.peer) is None
        ):
            model = settings.build_model(name, setting)
            trow = torch_peer.run_torch(
                name, setting, wl, row["block_drop_rates"], bool(model.scale_by_keep), args
            )
            rows.append(trow)
            _log(trow)
            gc.collect()

    compile_rows = []
    for name in _csv(args.compile_only_models):
        wl = settings.workload(name, args)
        crow = timing.run_jax(name, wl.setting("constant+scan"), wl, args, compile_only=True)
        compile_rows.append(crow)
        _log(crow)
        gc.collect()

    summary = analysis.summarize_models(rows)
    prov = common.provenance()
    prov["versions"] = common.versions(("jax", "jaxlib", "flax", "optax", "numpy", "torch"))
    result = {
        "provenance": prov,
        "machine_extra": {
            "cpus_available": cpus,
            "host_malloc_applied": malloc_applied,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "torch_status": torch_status,
        "config": vars(args),
        "rows": rows,
        "compile_only": compile_rows,
        "summary": summary,
        "targets": analysis.evaluate_targets(rows, summary, compile_rows),
    }
    out_dir = pathlib.Path(args.out_dir)
    common.write_json(out_dir / "benchmark.json", result)
    markdown = report.render_markdown(result)
    (out_dir / "benchmark.md").write_text(markdown, encoding="utf-8")
    print(markdown, flush=True)
    print(f"[benchmark] wrote {out_dir / 'benchmark.json'} and {out_dir / 'benchmark.md'}")
    return result


if __name__ == "__main__":
    main()
