"""oneDNN route vs XLA vs PyTorch: per-convolution times and a CIFAR ResNet train step.

Side by side in one process: each CIFAR ResNet convolution (batch 128, SAME padding) timed as
a jitted forward and forward+backward (input and kernel gradients) with ``impl="xla"`` (stock
`lax.conv_general_dilated`), ``impl="xla_custom_vjp"`` (sdjax's XLA formulations, labelled ``fast``) and ``impl="onednn"``
(sdjax.onednn), and in PyTorch eager with channels-last tensors (PyTorch's bundled oneDNN).
The implementations are timed in interleaved rounds so that load from other processes on a
shared machine affects all of them alike; each figure is the median over all rounds.
``--model_steps N`` also times N train steps (plain jitted SGD, after one warm-up step) of
``sdjax.models.create(model, conv_impl=...)`` for ``fast`` and ``onednn``.

    python -m experiments.convolutions.onednn_microbench                  # experiments/convolutions/results/onednn/
    python -m experiments.convolutions.onednn_microbench --model_steps 5  # plus cifar_resnet56 steps

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

import jax
import jax.numpy as jnp

from experiments import common
from experiments.common import timing
from experiments.convolutions import cases
from sdjax import conv, host_malloc, models, onednn

torch = None  # imported in main(), after oneDNN's OpenMP runtime is loaded (see there)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "onednn"
IMPLS = ("xla", "fast", "onednn")
# The label "fast" (kept in the recorded results) is conv_impl="xla_custom_vjp" (its name before 0.2.0).
SDJAX_IMPL = {"xla": "xla", "fast": "xla_custom_vjp", "onednn": "onednn"}

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


def _conv_fn(impl, stride, groups, pass_):
    def fn(x, kernel):
        return conv.conv2d(
            x, kernel, strides=stride, feature_group_count=groups, impl=SDJAX_IMPL[impl]
        )

    if pass_ == "fwd":
        return jax.jit(fn)

    def fwd_bwd(x, kernel, cotangent):
        out, vjp = jax.vjp(fn, x, kernel)
        return out, vjp(cotangent)

    return jax.jit(fwd_bwd)


def _call_blocking(fn, call_args):
    return jax.block_until_ready(fn(*call_args))


def _interleaved(callables: dict, rounds: int, per_round: int) -> dict:
    """Median ms of each zero-argument callable, timed in alternating rounds after a warm-up."""
    times = timing.interleaved(callables, rounds=rounds, per_round=per_round)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_convs(args) -> list[dict]:
    rows = []
    for name, (x_shape, k_shape, stride, groups) in CASES.items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        x, kernel, cotangent = cases.inputs(x_shape, k_shape, stride, groups)
        for pass_ in ("fwd", "fwd+bwd"):
            call_args = (x, kernel) if pass_ == "fwd" else (x, kernel, cotangent)
            callables = {}
            for impl in IMPLS:
                fn = _conv_fn(impl, stride, groups, pass_)
                callables[impl] = functools.partial(_call_blocking, fn, call_args)
            if torch is not None:
                callables["torch"] = cases.torch_conv(x, kernel, cotangent, stride, groups, pass_)
            ms = _interleaved(callables, args.rounds, args.per_round)
            rows.append(dict(case=name, pass_=pass_, x_shape=x_shape, kernel_shape=k_shape, **ms))
            print(name, pass_, {k: round(v, 2) for k, v in ms.items()}, flush=True)
    return rows


def _model_step(model_name, conv_impl, batch, **overrides):
    model = models.create(model_name, conv_impl=SDJAX_IMPL[conv_impl], **overrides)
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
    from experiments.reference import torch_models

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
        f"Host: {cpu['model']}, ISA {common.isa_text(cpu['isa'])}, {cpu['cores']} cores; "
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
            f"(experiments/reference/torch_models.py); median of {m['steps_per_impl']} interleaved steps:",
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
        "cpu": {
            "model": common.machine()["cpu"],
            "isa": common.cpu_isa(),
            "cores": len(os.sched_getaffinity(0)),
        },
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
