"""Step-level equivalence of sdjax's CIFAR ResNet and the PyTorch reference, same weights and gates.

Copies an sdjax `CifarResNet`'s variables into `experiments.reference.torch_models.CifarResNet` and checks,
for one batch:

* evaluation logits (running BatchNorm averages, branch scaled by `1 - rate`) agree;
* training logits agree when the PyTorch blocks are forced to the gates sdjax's key draws
  (`sdjax.models.batch_gates`), and sdjax's gates for that key are also what the forward
  pass used (a skipped block leaves its BatchNorm statistics unchanged, a kept one updates them;
  the updated running means agree, the running variances up to PyTorch's n/(n-1) correction);
* the loss gradients agree (zero in sdjax / absent in PyTorch for the skipped blocks' branches);
* the scanned layout (`scan_blocks=True`, the digits config's) gives the same training logits;
* over `gate_draws` keys, block l is kept with frequency `1 - rate_l` (max |z| reported; a
  value above ~4 flags a wrong per-block rate).

Each check returns the largest absolute difference; `main` prints them and fails on a mismatch.

    python -m experiments.reference.equivalence --depth 32 --keys 4
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np


def _to_torch_state(variables: dict[str, Any], depth: int) -> dict[str, np.ndarray]:
    """The torch `state_dict` (numpy arrays) of an unrolled sdjax CifarResNet's variables."""
    p, s = variables["params"], variables["batch_stats"]
    out: dict[str, np.ndarray] = {}

    def conv(name, kernel):
        out[name + ".weight"] = np.asarray(kernel).transpose(3, 2, 0, 1)

    def bn(name, params, stats):
        out[name + ".weight"] = np.asarray(params["scale"])
        out[name + ".bias"] = np.asarray(params["bias"])
        out[name + ".running_mean"] = np.asarray(stats["mean"])
        out[name + ".running_var"] = np.asarray(stats["var"])

    conv("stem.0", p["stem_conv"]["kernel"])
    bn("stem.1", p["stem_bn"], s["stem_bn"])
    n = (depth - 2) // 6
    for b in range(3 * n):
        name = f"stage{b // n + 1}_block{b % n}"
        bp, bs = p[name]["residual"]["branch"], s[name]["residual"]["branch"]
        prefix = f"blocks.{b}.residual.branch"
        conv(prefix + ".0", bp["conv1"]["kernel"])
        bn(prefix + ".1", bp["bn1"], bs["bn1"])
        conv(prefix + ".3", bp["conv2"]["kernel"])
        bn(prefix + ".4", bp["bn2"], bs["bn2"])
    out["fc.weight"] = np.asarray(p["head"]["kernel"]).T
    out["fc.bias"] = np.asarray(p["head"]["bias"])
    return out


def compare(
    depth: int = 20,
    num_keys: int = 3,
    batch: int = 16,
    seed: int = 0,
    same_padding: bool = True,
    gate_draws: int = 4000,
    image_size: int = 8,
    channels: int = 1,
) -> dict[str, float]:
    """Runs the checks of the module docstring; returns the largest differences found."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import torch.nn.functional as F

    from experiments.reference import torch_models, train_torch
    from sdjax import models

    torch.set_num_threads(1)
    kwargs = dict(num_classes=10, input_channels=channels, final_drop_rate=0.5, drop_mode="batch")
    unrolled = models.create(f"cifar_resnet{depth}", scan_blocks=False, **kwargs)
    scanned = models.create(f"cifar_resnet{depth}", scan_blocks=True, **kwargs)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, image_size, image_size, channels)).astype(np.float32)
    y = rng.integers(0, 10, size=batch)
    variables = unrolled.init(
        {"params": jax.random.key(seed)}, jnp.zeros((1, image_size, image_size, channels))
    )
    # Non-trivial running statistics, so that evaluation exercises them.
    stats = {
        name: jax.tree_util.tree_map(
            lambda a, lo=lo, hi=hi: jnp.asarray(rng.uniform(lo, hi, a.shape), a.dtype), sub
        )
        for name, sub in variables["batch_stats"].items()
        for lo, hi in [(-0.3, 0.3)]
    }
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 1.0 if getattr(path[-1], "key", None) == "var" else a, stats
    )
    variables = {"params": variables["params"], "batch_stats": stats}
    scan_vars = models.unrolled_to_scan(variables)

    # The paper's rule written independently of sdjax: eval logits then check sdjax's indexing.
    rates = train_torch.linear_rates(unrolled.num_blocks, 0.5)
    tmodel = torch_models.CifarResNet(
        depth, rates, "batch", False, 10, input_channels=channels, same_padding=same_padding
    )
    state = {k: torch.from_numpy(np.array(v)) for k, v in _to_torch_state(variables, depth).items()}
    missing = tmodel.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if "num_batches" not in k], missing
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    diffs: dict[str, float] = {}

    tmodel.eval()
    with torch.no_grad():
        t_eval = tmodel(xt).numpy()
    j_eval = np.asarray(unrolled.apply(variables, x, train=False))
    diffs["eval_logits"] = float(np.abs(t_eval - j_eval).max())
    diffs["eval_logits_scale"] = float(np.abs(j_eval).max())

    for k in range(num_keys):
        key = jax.random.key(100 + k)
        gates = np.asarray(models.batch_gates(unrolled, key))

        def loss_fn(params, model=unrolled, vs=variables, key=key):
            logits, new = model.apply(
                {"params": params, "batch_stats": vs["batch_stats"]},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, new["batch_stats"])

        (j_loss, (j_logits, j_stats)), j_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        fresh = torch_models.CifarResNet(
            depth, rates, "batch", False, 10, input_channels=channels, same_padding=same_padding
        )
        fresh.load_state_dict(state, strict=False)
        for block, gate in zip(fresh.blocks, gates, strict=True):
            block.residual.drop_rate = 0.0 if gate else 1.0  # forced gate
        fresh.train()
        t_logits = fresh(xt)
        t_loss = F.cross_entropy(t_logits, yt)
        t_loss.backward()
        diffs[f"train_logits_key{k}"] = float(np.abs(t_logits.detach().numpy() - j_logits).max())
        diffs[f"train_loss_key{k}"] = abs(float(t_loss.detach()) - float(j_loss))

        t_state = fresh.state_dict()
        j_torch = _to_torch_state({"params": variables["params"], "batch_stats": j_stats}, depth)
        mean_diff = var_diff = 0.0
        for name, value in j_torch.items():
            if name.endswith("running_mean"):
                mean_diff = max(mean_diff, float(np.abs(t_state[name].numpy() - value).max()))
            if name.endswith("running_var"):
                old = state[name].numpy()
                t_new = t_state[name].numpy()
                # Undo torch's unbiased correction: batch var = (new - 0.9 old) / 0.1.
                n = batch * _spatial(name, depth, image_size)
                if np.array_equal(t_new, old):  # a skipped block: sdjax must not update either
                    t_batch, j_batch = t_new, value
                else:
                    t_batch = (t_new - 0.9 * old) / 0.1 * (n - 1) / n
                    j_batch = (value - 0.9 * old) / 0.1
                var_diff = max(var_diff, float(np.abs(t_batch - j_batch).max()))
        diffs[f"running_mean_key{k}"] = mean_diff
        diffs[f"running_var_key{k}"] = var_diff

        g_torch = {
            n: (q.grad.numpy() if q.grad is not None else np.zeros(q.shape, np.float32))
            for n, q in fresh.named_parameters()
        }
        g_jax = _to_torch_state({"params": j_grads, "batch_stats": stats}, depth)
        diffs[f"grads_key{k}"] = max(float(np.abs(g_torch[n] - g_jax[n]).max()) for n in g_torch)
        skipped = [b for b, g in enumerate(gates) if not g]
        diffs[f"skipped_blocks_key{k}"] = float(len(skipped))
        if True:
            s_logits, _ = scanned.apply(
                scan_vars, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            diffs[f"scanned_train_logits_key{k}"] = float(
                np.abs(np.asarray(s_logits) - j_logits).max()
            )
    # Gate frequencies: block l is kept with probability 1 - rate_l (z-score over many keys).
    keys = jax.random.split(jax.random.key(seed + 1), gate_draws)
    kept = np.asarray(jax.vmap(lambda k: models.batch_gates(unrolled, k))(keys)).mean(0)
    keep = 1.0 - np.asarray(rates)
    z = np.abs(kept - keep) / np.sqrt(keep * (1 - keep) / gate_draws)
    diffs["gate_frequency_max_abs_z"] = float(z.max())
    return diffs


def trajectory(
    depth: int = 20,
    steps: int = 8,
    batch: int = 32,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-step training losses of both frameworks from the same weights on the same batches.

    Constant depth, `configs/cifar10_sd.py`'s optimizer as sdjax builds it (`sdjax.optim.create`:
    weight decay before Nesterov momentum, lr 0.1 for these few steps) against the reference's
    `torch.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)`; batch `s` is a
    fixed Gaussian batch with random labels. The losses agree to float rounding while training is
    smooth; at lr 0.1 without warm-up the early steps are unstable and rounding differences grow
    step by step (chaotically), so only the first few steps are a test of the update rule.

    Returns: `{"sdjax": [...], "torch": [...]}`, the loss before each update.
    """
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import torch.nn.functional as F

    from experiments.reference import torch_models
    from sdjax import models, optim
    from sdjax.config import default_config

    torch.set_num_threads(1)
    config = default_config()
    config.optim.update(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True,
                        weight_decay=1e-4, weight_decay_on="all", lr_schedule="constant")  # fmt: skip
    model = models.create(f"cifar_resnet{depth}", scan_blocks=False, num_classes=10,
                          input_channels=channels, final_drop_rate=0.0)  # fmt: skip
    variables = model.init(
        {"params": jax.random.key(seed)}, jnp.zeros((1, image_size, image_size, channels))
    )
    tmodel = torch_models.CifarResNet(
        depth, None, "batch", False, 10, input_channels=channels, same_padding=True
    )
    state = {k: torch.from_numpy(np.array(v)) for k, v in _to_torch_state(variables, depth).items()}
    tmodel.load_state_dict(state, strict=False)
    tmodel.train()
    topt = torch.optim.SGD(
        tmodel.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    tx = optim.create(config.optim, total_steps=steps, steps_per_epoch=steps)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])  # fmt: skip
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"sdjax": [], "torch": []}
    for _ in range(steps):
        x = rng.normal(size=(batch, image_size, image_size, channels)).astype(np.float32)
        y = rng.integers(0, 10, size=batch)
        params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
        out["sdjax"].append(float(loss))
        topt.zero_grad()
        tloss = F.cross_entropy(
            tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), torch.from_numpy(y)
        )
        tloss.backward()
        topt.step()
        out["torch"].append(float(tloss.detach()))
    return out


def _spatial(name: str, depth: int, image_size: int = 8) -> int:
    """H*W of the activations a BatchNorm named `name` normalises (square input)."""
    if name.startswith("stem"):
        return image_size * image_size
    n = (depth - 2) // 6
    b = int(name.split(".")[1])
    hw = image_size // (2 ** (b // n))
    return hw * hw


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--keys", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument(
        "--symmetric_padding", action="store_true", help="PyTorch's padding=1 on stride-2 convs"
    )
    parser.add_argument("--image_size", type=int, default=8, help="8: digits, 32: CIFAR-10")
    parser.add_argument("--channels", type=int, default=1, help="1: digits, 3: CIFAR-10")
    parser.add_argument(
        "--trajectory_steps", type=int, default=0,
        help="also train this many steps in both frameworks from the same weights (see trajectory)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the differences to this JSON file")
    args = parser.parse_args(argv)
    diffs = compare(
        args.depth,
        args.keys,
        same_padding=not args.symmetric_padding,
        image_size=args.image_size,
        channels=args.channels,
    )
    losses = None
    if args.trajectory_steps:
        losses = trajectory(args.depth, args.trajectory_steps, image_size=args.image_size,
                            channels=args.channels)  # fmt: skip
        diffs["trajectory_first_step_loss"] = abs(losses["sdjax"][0] - losses["torch"][0])
    print(json.dumps({**diffs, "trajectory_losses": losses}, indent=1))
    if args.out:
        from experiments import common

        prov = common.provenance()
        prov["versions"].update(common.versions(("torch",)))
        common.write_json(
            args.out,
            {
                "max_abs_differences": diffs,
                "trajectory_losses": losses,
                "tolerance": args.tolerance,
                "provenance": prov,
            },
        )
    bad = {
        k: v
        for k, v in diffs.items()
        if k.split("_")[0] not in ("skipped", "gate") and "scale" not in k and v > args.tolerance
    }
    if diffs["gate_frequency_max_abs_z"] > 5.0:
        bad["gate_frequency_max_abs_z"] = diffs["gate_frequency_max_abs_z"]
    if bad:
        raise SystemExit(f"mismatch beyond {args.tolerance}: {bad}")
    return diffs


if __name__ == "__main__":
    main()
