"""Micro-benchmark of sdjax.conv.conv2d: stock XLA convolution vs the CPU fast path.

Times the forward pass and forward+backward (gradients with respect to the input and
the kernel) of single convolutions at CIFAR ResNet and EfficientNet shapes, at top
level and inside a `lax.cond` (where XLA:CPU's convolution gradients are slowest).
Each figure is the median wall time of >= 10 jitted calls after warm-up; the CPU
time per call (all threads) is recorded too, since the machine may be shared.
When PyTorch is importable (the ``bench`` extra), the same convolution in PyTorch
eager (channels-last, oneDNN on CPU) is timed at top level in the same process, and
the table gives the fast path's GFLOP/s and its time relative to PyTorch: the
kernel-level gap behind the train-step ratio of `experiments/benchmark/benchmark.py`.

    python -m experiments.convolutions.conv_microbench            # writes experiments/convolutions/results/conv_microbench.{json,md}
    python -m experiments.convolutions.conv_microbench --quick    # smaller batch, fewer repeats (a smoke run)
    python -m experiments.convolutions.conv_microbench --explore  # also times every k x k formulation
                                                     # (experiments/convolutions/conv_formulations.py)

The JSON and markdown record the command, versions, git commit and machine (CPU model and ISA:
AVX2 / AVX-512 / AMX) from `experiments.common.provenance`. No randomness beyond fixed-key
inputs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import shlex

import jax
import jax.numpy as jnp
from jax import lax

from experiments import common
from experiments.common import timing
from experiments.convolutions import cases, conv_formulations
from sdjax import conv, host_malloc

try:  # the `bench` extra
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

# name: (x shape NHWC, kernel shape HWIO, stride, feature_group_count)
CASES = {
    "cifar 3x3 16->16 32x32 s1": ((128, 32, 32, 16), (3, 3, 16, 16), 1, 1),
    "cifar 3x3 16->32 32x32 s2": ((128, 32, 32, 16), (3, 3, 16, 32), 2, 1),
    "cifar 3x3 32->32 16x16 s1": ((128, 16, 16, 32), (3, 3, 32, 32), 1, 1),
    "cifar 3x3 32->64 16x16 s2": ((128, 16, 16, 32), (3, 3, 32, 64), 2, 1),
    "cifar 3x3 64->64 8x8 s1": ((128, 8, 8, 64), (3, 3, 64, 64), 1, 1),
    "effnet dw 3x3 96 16x16 s1": ((64, 16, 16, 96), (3, 3, 1, 96), 1, 96),
    "effnet 1x1 96->24 16x16": ((64, 16, 16, 96), (1, 1, 96, 24), 1, 1),
}


def _make_fn(impl, stride, groups, context, pass_, formulation=None):
    def conv_fn(x, kernel):
        if formulation is not None:
            return conv_formulations.conv2d(x, kernel, strides=stride, formulation=formulation)
        return conv.conv2d(x, kernel, strides=stride, feature_group_count=groups, impl=impl)

    if context == "cond":
        inner = conv_fn

        def conv_fn(x, kernel):  # noqa: F811 -- the same conv, in a lax.cond branch
            return lax.cond(
                x[0, 0, 0, 0] > -1e30,
                lambda ops: inner(*ops),
                lambda ops: jnp.zeros_like(inner(*ops)),
                (x, kernel),
            )

    if pass_ == "fwd":
        return jax.jit(conv_fn)

    def fwd_bwd(x, kernel, cotangent):
        out, vjp = jax.vjp(conv_fn, x, kernel)
        return out, vjp(cotangent)

    return jax.jit(fwd_bwd)


def _time(fn, args, repeats, warmup):
    t = timing.time_calls(lambda: jax.block_until_ready(fn(*args)), repeats=repeats, warmup=warmup)
    t["compile_s"] = t.pop("first_call_s")
    return t


def _time_torch(fn, repeats, warmup):
    t = timing.time_calls(fn, repeats=repeats, warmup=warmup)
    return {"median_ms": t["median_ms"], "min_ms": t["min_ms"]}


def _flops(x_shape, k_shape, stride, groups, pass_) -> float:
    """Multiply-adds x 2 of the convolution (SAME padding); fwd+bwd counts 3 convolutions."""
    n, h, w, _ = x_shape
    kh, kw, cin_per_group, cout = k_shape
    ho, wo = -(-h // stride), -(-w // stride)
    fwd = 2.0 * n * ho * wo * cout * kh * kw * cin_per_group
    return fwd if pass_ == "fwd" else 3.0 * fwd


def run(args) -> dict:
    rows = []
    for (name, (x_shape, k_shape, stride, groups)), context, pass_ in itertools.product(
        CASES.items(), ("top", "cond"), ("fwd", "fwd+bwd")
    ):
        if args.cases and not any(c in name for c in args.cases):
            continue
        x, kernel, cotangent = cases.inputs(x_shape, k_shape, stride, groups, args.batch)
        call_args = (x, kernel) if pass_ == "fwd" else (x, kernel, cotangent)
        variants = [("xla", None), ("fast", None)]
        if args.explore and groups == 1 and k_shape[0] > 1:
            variants += [(f"fast[{','.join(f)}]", f) for f in conv_formulations.formulations(pass_)]
        for label, formulation in variants:
            # The label "fast" (kept in the recorded rows) is conv_impl="xla_custom_vjp".
            impl = "xla" if label == "xla" else "xla_custom_vjp"
            fn = _make_fn(impl, stride, groups, context, pass_, formulation)
            timing = _time(fn, call_args, args.repeats, args.warmup)
            row = dict(case=name, context=context, pass_=pass_, impl=label, **timing)
            row["x_shape"], row["kernel_shape"] = list(x.shape), list(kernel.shape)
            row["gflops"] = _flops(x.shape, kernel.shape, stride, groups, pass_) / 1e9
            rows.append(row)
            print(
                f"{name:28s} {context:4s} {pass_:7s} {label:26s} "
                f"{row['median_ms']:9.2f} ms  cpu {row['cpu_ms']:9.2f} ms  "
                f"compile {row['compile_s']:.2f} s",
                flush=True,
            )
        if torch is not None and context == "top" and not args.no_torch:
            fn = cases.torch_conv(x, kernel, cotangent, stride, groups, pass_)
            timing = _time_torch(fn, args.repeats, args.warmup)
            rows.append(dict(case=name, context=context, pass_=pass_, impl="torch", **timing))
            print(f"{name:28s} {context:4s} {pass_:7s} {'torch':26s} {timing['median_ms']:9.2f} ms")
    prov = common.provenance()
    if args.argv is not None:  # called from Python: the command that would do the same
        prov["command"] = shlex.join(
            ["python", "-m", "experiments.convolutions.conv_microbench", *args.argv]
        )
    prov["versions"] = common.versions(("jax", "jaxlib", "numpy", "torch"))
    return {
        "provenance": prov,
        "command": prov["command"],
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "platform": prov["machine"]["platform"],
        "cpu": prov["machine"]["cpu"],
        "cpu_isa": prov["machine"]["cpu_isa"],
        "cpu_count": prov["machine"]["cpu_count"],
        "torch": "not run"
        if torch is None or args.no_torch
        else (f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
        "load_average_at_end": os.getloadavg(),
        "host_malloc_applied": args.host_malloc_applied,
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        "# conv2d micro-benchmark: stock XLA conv vs sdjax fast path",
        "",
        f"Command: `{result['command']}`  ",
        f"jax {result['jax_version']}, backend {result['backend']}, {result['cpu_count']} CPUs, "
        f"load average at end {tuple(round(v, 1) for v in result['load_average_at_end'])}.  ",
        f"CPU: {result.get('cpu', 'unknown')}, ISA: {common.isa_text(result.get('cpu_isa'))}.  ",
        f"PyTorch: {result.get('torch', 'not run')}.  ",
        "Median wall ms per call (jitted, after warm-up); speedup = xla / fast; fast GFLOP/s = "
        "2 x multiply-adds (x3 for fwd+bwd) / fast ms; PyTorch: eager, channels-last (oneDNN), "
        "top level only.",
        "",
        "| case | context | pass | xla ms | fast ms | speedup | fast GFLOP/s | PyTorch ms "
        "| fast / PyTorch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {}
    for row in result["rows"]:
        by_key.setdefault((row["case"], row["context"], row["pass_"]), {})[row["impl"]] = row
    for (case, context, pass_), impls in by_key.items():
        xla, fast = impls["xla"]["median_ms"], impls["fast"]["median_ms"]
        gflops = impls["fast"].get("gflops")
        rate = f"{gflops / fast * 1e3:.0f}" if gflops else "n/a"
        peer = impls.get("torch")
        peer_ms = f"{peer['median_ms']:.2f}" if peer else "n/a"
        peer_ratio = f"{fast / peer['median_ms']:.2f}" if peer else "n/a"
        lines.append(
            f"| {case} | {context} | {pass_} | {xla:.2f} | {fast:.2f} | {xla / fast:.1f}x "
            f"| {rate} | {peer_ms} | {peer_ratio} |"
        )
    extra = [r for r in result["rows"] if r["impl"] not in ("xla", "fast", "torch")]
    if extra:
        lines += ["", "Formulations of the k x k fast path (forward, dkernel, dx):", ""]
        lines += ["| case | context | pass | formulation | ms |", "|---|---|---|---|---:|"]
        for r in extra:
            lines.append(
                f"| {r['case']} | {r['context']} | {r['pass_']} | {r['impl']} | "
                f"{r['median_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 10 repeats, 1 warm-up")
    parser.add_argument("--explore", action="store_true", help="time every k x k formulation")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (>= 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch column")
    parser.add_argument(
        "--host_malloc",
        choices=host_malloc.MODES,
        default="auto",
        help="host allocator setting (sdjax.host_malloc; default auto: buffers reused across "
        "calls on CPU, as the trainer does; system: glibc's defaults)",
    )
    parser.add_argument("--out_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.host_malloc_applied = host_malloc.configure(args.host_malloc)
    args.argv = None if argv is None else list(argv)
    if args.quick:
        args.batch = args.batch or 32
        args.warmup = 1
    args.repeats = max(10, args.repeats or 10)
    result = run(args)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "conv_microbench.json", result)
    (out_dir / "conv_microbench.md").write_text(to_markdown(result))
    print(f"wrote {out_dir / 'conv_microbench.json'} and conv_microbench.md")


if __name__ == "__main__":
    main()
