"""oneDNN route vs XLA vs PyTorch: per-convolution times and a CIFAR ResNet train step.

Side by side in one process: each CIFAR ResNet convolution (batch 128, SAME padding) timed as
a jitted forward and forward+backward (input and kernel gradients) with ``impl="xla"`` (stock
`lax.conv_general_dilated`), ``impl="fast"`` (sdjax's XLA formulations) and ``impl="onednn"``
(sdjax.onednn), and in PyTorch eager with channels-last tensors (PyTorch's bundled oneDNN).
The implementations are timed in interleaved rounds so that load from other processes on a
shared machine affects all of them alike; each figure is the median over all rounds.
``--model_steps N`` also times N train steps (plain jitted SGD, after one warm-up step) of
``sdjax.models.create(model, conv_impl=...)`` for ``fast`` and ``onednn``.

    python -m experiments.onednn_microbench                  # experiments/results/onednn/
    python -m experiments.onednn_microbench --model_steps 5  # plus cifar_resnet56 steps

The CPU model and its vector ISA (AVX2 / AVX-512 / AVX-512 BF16 / AMX) are recorded.
No randomness beyond fixed-key inputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from sdjax import conv, host_malloc, models, onednn

torch = None  # imported in main(), after oneDNN's OpenMP runtime is loaded (see there)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "onednn"
IMPLS = ("xla", "fast", "onednn")

# name: (x shape NHWC, kernel shape HWIO, stride, feature_group_count)
CASES = {
    "3x3 16->16 32x32 s1": ((128, 32, 32, 16), (3, 3, 16, 16), 1, 1),
    "3x3 16->32 32x32 s2": ((128, 32, 32, 16), (3, 3, 16, 32), 2, 1),
    "3x3 32->32 16x16 s1": ((128, 16, 16, 32), (3, 3, 32, 32), 1, 1),
    "3x3 32->64 16x16 s2": ((128, 16, 16, 32), (3, 3, 32, 64), 2, 1),
    "3x3 64->64 8x8 s1": ((128, 8, 8, 64), (3, 3, 64, 64), 1, 1),
    "dw 3x3 96 16x16 s1": ((64, 16, 16, 96), (3, 3, 1, 96), 1, 96),
    "1x1 96->24 16x16 s1": ((64, 16, 16, 96), (1, 1, 96, 24), 1, 1),
}


def cpu_isa() -> dict:
    """CPU model (lscpu) and which vector ISA extensions /proc/cpuinfo lists."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = common.machine()["cpu"]
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            model,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]
    return {"model": model, "isa": isa, "cores": len(os.sched_getaffinity(0))}


def _conv_fn(impl, stride, groups, pass_):
    def fn(x, kernel):
        return conv.conv2d(x, kernel, strides=stride, feature_group_count=groups, impl=impl)

    if pass_ == "fwd":
        return jax.jit(fn)

    def fwd_bwd(x, kernel, cotangent):
        out, vjp = jax.vjp(fn, x, kernel)
        return out, vjp(cotangent)

    return jax.jit(fwd_bwd)


def _torch_fn(x, kernel, cotangent, stride, groups, pass_):
    """The same convolution in PyTorch eager, channels-last (oneDNN on CPU)."""
    kh = kernel.shape[0]
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).clone()
    tk = (
        torch.from_numpy(np.array(kernel))
        .permute(3, 2, 0, 1)
        .contiguous(memory_format=torch.channels_last)
    )
    tg = torch.from_numpy(np.array(cotangent)).permute(0, 3, 1, 2).clone()

    def conv_fn(a, b):
        return torch.nn.functional.conv2d(a, b, stride=stride, padding=kh // 2, groups=groups)

    if pass_ == "fwd":
        return lambda: conv_fn(tx, tk)
    tx_, tk_ = tx.clone().requires_grad_(), tk.clone().requires_grad_()

    def run():
        tx_.grad = tk_.grad = None
        out = conv_fn(tx_, tk_)
        out.backward(tg[:, :, : out.shape[2], : out.shape[3]])
        return out

    return run


def _inputs(x_shape, k_shape, stride, groups):
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    kernel = jax.random.normal(kk, k_shape, jnp.float32) * 0.1
    out = jax.eval_shape(
        lambda a, b: conv.conv2d(a, b, strides=stride, feature_group_count=groups, impl="xla"),
        x,
        kernel,
    )
    return x, kernel, jax.random.normal(kc, out.shape, jnp.float32)


def _call_blocking(fn, call_args):
    return jax.block_until_ready(fn(*call_args))


def _interleaved(callables: dict, rounds: int, per_round: int) -> dict:
    """Median ms of each zero-argument callable, timed in alternating rounds after a warm-up."""
    for fn in callables.values():
        fn()
        fn()
    times = {name: [] for name in callables}
    for _ in range(rounds):
        for name, fn in callables.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_convs(args) -> list[dict]:
    rows = []
    for name, (x_shape, k_shape, stride, groups) in CASES.items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        x, kernel, cotangent = _inputs(x_shape, k_shape, stride, groups)
        for pass_ in ("fwd", "fwd+bwd"):
            call_args = (x, kernel) if pass_ == "fwd" else (x, kernel, cotangent)
            callables = {}
            for impl in IMPLS:
                fn = _conv_fn(impl, stride, groups, pass_)
                callables[impl] = functools.partial(_call_blocking, fn, call_args)
            if torch is not None:
                callables["torch"] = _torch_fn(x, kernel, cotangent, stride, groups, pass_)
            ms = _interleaved(callables, args.rounds, args.per_round)
            rows.append(dict(case=name, pass_=pass_, x_shape=x_shape, kernel_shape=k_shape, **ms))
            print(name, pass_, {k: round(v, 2) for k, v in ms.items()}, flush=True)
    return rows


def _model_step(model_name, conv_impl, batch, **overrides):
    model = models.create(model_name, conv_impl=conv_impl, **overrides)
    images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = model.init({"params": jax.random.key(2)}, images, train=False)

    def loss_fn(params, batch_stats, key):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
        return loss, new_vars["batch_stats"]

    @jax.jit
    def step(params, batch_stats, key):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, key)
        params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
        return params, stats, loss

    state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def run():
        p, s, loss = step(state["params"], state["batch_stats"], jax.random.key(3))
        state["params"], state["batch_stats"] = p, s
        jax.block_until_ready(loss)

    return run


def _torch_step(model_name, batch):
    from experiments import torch_models

    torch.manual_seed(0)
    model = torch_models.create(
        model_name, drop_rates=None, drop_mode="row", scale_by_keep=True, num_classes=10
    )
    step = torch_models.make_train_step(model)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    return lambda: step(images, labels)


def time_model(args) -> dict:
    """Median step ms: constant depth (fast, onednn, torch) and the model's default drop mode."""
    callables = {
        f"{impl} constant": _model_step(args.model, impl, 128, final_drop_rate=0.0)
        for impl in ("fast", "onednn")
    }
    callables.update(
        {f"{impl} default drop": _model_step(args.model, impl, 128) for impl in ("fast", "onednn")}
    )
    if torch is not None:
        callables["torch constant"] = _torch_step(args.model, 128)
    ms = _interleaved(callables, rounds=args.model_steps, per_round=1)
    print(args.model, {k: round(v, 1) for k, v in ms.items()}, flush=True)
    return dict(model=args.model, batch=128, steps_per_impl=args.model_steps, ms=ms)


def to_markdown(result: dict) -> str:
    cpu = result["cpu"]
    lines = [
        "# oneDNN route vs XLA vs PyTorch (per convolution)",
        "",
        f"Host: {cpu['model']}, ISA {', '.join(cpu['isa'])}, {cpu['cores']} cores; "
        f"oneDNN kernels: {result['onednn_impl']}, threads {result['onednn_threads']}, "
        f"OMP_WAIT_POLICY {result['omp_wait_policy']}; PyTorch: {result['torch']}.  ",
        "Median wall ms per call (jitted; interleaved rounds in one process; shared machine: "
        "compare ratios). xla = stock lax conv, fast = sdjax XLA formulations, onednn = "
        "sdjax.onednn, torch = PyTorch eager channels-last.",
        "",
        "| case | pass | xla | fast | onednn | torch | onednn / fast | onednn / torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        torch_ms = r.get("torch")
        lines.append(
            f"| {r['case']} | {r['pass_']} | {r['xla']:.2f} | {r['fast']:.2f} | "
            f"{r['onednn']:.2f} | {torch_ms:.2f} | {r['onednn'] / r['fast']:.2f} | "
            f"{r['onednn'] / torch_ms:.2f} |"
            if torch_ms
            else f"| {r['case']} | {r['pass_']} | {r['xla']:.2f} | {r['fast']:.2f} | "
            f"{r['onednn']:.2f} | n/a | {r['onednn'] / r['fast']:.2f} | n/a |"
        )
    if result.get("model"):
        m = result["model"]
        ms = m["ms"]
        lines += [
            "",
            f"Train step of `models.create({m['model']!r}, conv_impl=...)` (constant: "
            "`final_drop_rate=0.0`; default drop: the model's default stochastic depth), batch "
            f"{m['batch']}, plain jitted SGD, vs the PyTorch eager peer "
            f"(experiments/torch_models.py); median of {m['steps_per_impl']} interleaved steps:",
            "",
            "| step | ms | / fast constant | / torch constant |",
            "|---|---:|---:|---:|",
        ]
        for name, value in ms.items():
            vs_torch = value / ms["torch constant"] if "torch constant" in ms else float("nan")
            lines.append(
                f"| {name} | {value:.0f} | {value / ms['fast constant']:.2f} | {vs_torch:.2f} |"
            )
    lines += ["", common.provenance_markdown(result["provenance"])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per_round", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--model_steps", type=int, default=0, help="0: no train-step timing")
    parser.add_argument("--out_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    host_malloc.configure("auto")
    reason = onednn.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"oneDNN route unavailable: {reason}")
    # PyTorch after sdjax.onednn: both then share one OpenMP runtime and its wait policy.
    global torch
    try:  # the `bench` extra
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        torch = None
    shape = CASES["3x3 16->16 32x32 s1"]
    result = {
        "cpu": cpu_isa(),
        "onednn_impl": onednn.impl_info("fwd", shape[0], shape[1], (1, 1), ((1, 1), (1, 1))),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "onednn_threads": os.environ.get("SDJAX_ONEDNN_THREADS", "cores / devices"),
        "torch": "not run"
        if torch is None
        else f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "rows": time_convs(args),
    }
    if args.model_steps:
        result["model"] = time_model(args)
    result["provenance"] = common.provenance()
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "onednn_microbench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "onednn_microbench.md").write_text(to_markdown(result))
    print(f"wrote {out_dir / 'onednn_microbench.json'} and onednn_microbench.md")


if __name__ == "__main__":
    main()
