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

`crossed_run` (`--crossed_seed`) goes from steps to a whole run: the CIFAR-10 comparison's
constant-depth run of a seed, both frameworks from the same weights on the same augmented
batches, taken from one framework's random draws (which decide the outcome; see the README).

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


def _from_torch_state(state: dict[str, Any], depth: int) -> dict[str, Any]:
    """The unrolled sdjax CifarResNet variables of a torch `state_dict` (inverse of
    `_to_torch_state`)."""
    a = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
         for k, v in state.items()}  # fmt: skip
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def conv(name):
        return {"kernel": a[name + ".weight"].transpose(2, 3, 1, 0)}

    def bn(name):
        return (
            {"scale": a[name + ".weight"], "bias": a[name + ".bias"]},
            {"mean": a[name + ".running_mean"], "var": a[name + ".running_var"]},
        )

    params["stem_conv"] = conv("stem.0")
    params["stem_bn"], stats["stem_bn"] = bn("stem.1")
    n = (depth - 2) // 6
    for b in range(3 * n):
        prefix = f"blocks.{b}.residual.branch"
        bn1, s1 = bn(prefix + ".1")
        bn2, s2 = bn(prefix + ".4")
        branch = {
            "conv1": conv(prefix + ".0"),
            "bn1": bn1,
            "conv2": conv(prefix + ".3"),
            "bn2": bn2,
        }
        name = f"stage{b // n + 1}_block{b % n}"
        params[name] = {"residual": {"branch": branch}}
        stats[name] = {"residual": {"branch": {"bn1": s1, "bn2": s2}}}
    params["head"] = {"kernel": a["fc.weight"].T, "bias": a["fc.bias"]}
    return {"params": params, "batch_stats": stats}


def crossed_run(
    seed: int,
    draws: str,
    data_dir: str | None = None,
    depth: int = 20,
    train_size: int = 1024,
    epochs: int = 20,
    frameworks: tuple[str, ...] = ("sdjax", "torch"),
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Both frameworks trained at constant depth from the same weights on the same batches.

    The CIFAR-10 comparison's constant-depth run (`compare.py --dataset cifar10`: ResNet-`depth`,
    `train[:train_size]`, `epochs` epochs, `configs/cifar10_sd.py:recipe=sdjax` as the regime
    study runs it) with the random draws of one framework for `seed`, fed to both:

    * `draws="sdjax"`: sdjax's initial weights (`sdjax.trainer.build`, the init key of `seed`)
      and sdjax's augmented batches (`data.train_batch` and `augment.preprocess` with the step's
      key `fold_in(fold_in(train_key, step), 1)`), i.e. the draws of sdjax's run of that seed;
    * `draws="torch"`: `train_torch`'s initial weights (`torch.manual_seed(seed)`,
      `init_like_sdjax`) and its augmented batches (`normalize`, `random_crop`, `random_flip`
      with `default_rng([seed, 7919])`), i.e. the draws of the PyTorch run of that seed.

    The example order is the same in both (`default_rng([seed, epoch]).permutation`). sdjax trains
    with `sdjax.steps.train_step` (its augmentation replaced by the identity, the batch being
    augmented already) and the optimizer sdjax builds for the config; PyTorch as `train_torch`
    (`torch.optim.SGD`, `train_torch.learning_rate`). `stop_after` ends the run early (the
    schedule still that of `epochs`; no evaluation then). Returns per-framework per-epoch mean
    train losses (over each epoch's steps, as `train_torch` reports them) and test errors with
    the running BatchNorm averages.
    """
    import functools
    import importlib.util
    import tempfile

    import jax
    import torch
    import torch.nn.functional as F

    from experiments import common
    from experiments.reference import torch_models, train_torch
    from sdjax import models, steps, trainer
    from sdjax.data.augment import preprocess
    from sdjax.data.pipeline import batch_indices

    if draws not in ("sdjax", "torch"):
        raise ValueError(f"draws must be sdjax or torch, got {draws!r}")
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(
        "cifar10_sd", common.REPO_ROOT / "configs" / "cifar10_sd.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("recipe=sdjax")
    config.model.name = f"cifar_resnet{depth}"
    config.model.final_drop_rate = 0.0
    config.input.train_split = f"train[:{train_size}]"
    config.train.num_epochs = epochs
    config.train.eval_every_epochs = epochs
    config.train.progress_bar = False
    config.train.tensorboard = False
    config.seed = seed
    if data_dir:
        config.input.data_dir = data_dir
    t = trainer.build(config, tempfile.mkdtemp(prefix="crossed_run_"))
    data, spe, total = t.data, t.steps_per_epoch, t.total_steps
    mean32 = np.asarray(data.mean, np.float32)
    std32 = np.asarray(data.std, np.float32)
    x_train = data.train[0].transpose(0, 3, 1, 2)  # NCHW uint8, as train_torch reads it
    x_train = train_torch.normalize(x_train, mean32, std32)
    y_train = np.asarray(data.train[1], np.int64)

    torch.manual_seed(seed)
    tmodel = torch_models.CifarResNet(depth, None, "batch", False, 10, input_channels=3,
                                      same_padding=True)  # fmt: skip
    if draws == "torch":
        train_torch.init_like_sdjax(tmodel)
        variables = models.unrolled_to_scan(_from_torch_state(tmodel.state_dict(), depth))
        state = t.state.replace(
            params=jax.tree.map(jax.numpy.asarray, variables["params"]),
            batch_stats=jax.tree.map(jax.numpy.asarray, variables["batch_stats"]),
        )
    else:
        state = t.state
        unrolled = models.scan_to_unrolled(
            {
                "params": jax.device_get(state.params),
                "batch_stats": jax.device_get(state.batch_stats),
            }
        )
        torch_state = {
            k: torch.from_numpy(np.array(v)) for k, v in _to_torch_state(unrolled, depth).items()
        }
        tmodel.load_state_dict(torch_state, strict=False)
    identity = dict(mean=(0.0,) * 3, std=(1.0,) * 3, crop_padding=0, flip=False)
    jax_step = jax.jit(functools.partial(steps.train_step, augment_kwargs=identity, num_classes=10))
    augment = jax.jit(functools.partial(preprocess, **data.augment_kwargs()))
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=1e-4)  # fmt: skip
    tmodel.train()
    augment_rng = np.random.default_rng([seed, 7919])
    losses: dict[str, list[float]] = {fw: [] for fw in frameworks}
    last = total if stop_after is None else min(stop_after, total)
    for step in range(last):
        idx = batch_indices(seed, step, config.train.batch_size, len(y_train))
        if draws == "torch":
            batch = train_torch.random_crop(x_train[idx], augment_rng, 4)
            batch = np.ascontiguousarray(train_torch.random_flip(batch, augment_rng))
            nhwc = batch.transpose(0, 2, 3, 1)
        else:
            key = jax.random.fold_in(jax.random.fold_in(t.train_key, step), 1)
            nhwc = np.asarray(augment(data.train[0][idx], key))
            batch = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
        if "sdjax" in frameworks:
            state, metrics = jax_step(
                state, {"image": nhwc, "label": data.train[1][idx]}, t.train_key
            )
            losses["sdjax"].append(float(metrics["loss"]))
        if "torch" in frameworks:
            for group in topt.param_groups:
                group["lr"] = train_torch.learning_rate(step, total, spe, warmup_epochs=0.0)
            topt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(tmodel(torch.from_numpy(batch)), torch.from_numpy(y_train[idx]))
            loss.backward()
            topt.step()
            losses["torch"].append(float(loss.detach()))
    out: dict[str, Any] = {"seed": seed, "draws": draws, "steps": last, "total_steps": total}
    for fw in frameworks:
        per_epoch = [float(np.mean(losses[fw][e : e + spe])) for e in range(0, last, spe)]
        out[fw] = {"train_loss_per_epoch": per_epoch, "step_losses": losses[fw]}
    if last < total:
        return out
    if "sdjax" in frameworks:
        correct = count = 0.0
        for b in data.eval_batches("test", config.train.eval_batch_size):
            m = t.eval_fn(state, b)
            correct += float(m["correct"])
            count += float(m["count"])
        out["sdjax"]["test_error"] = 1.0 - correct / count
    if "torch" in frameworks:
        x_test = train_torch.normalize(data.test[0].transpose(0, 3, 1, 2), mean32, std32)
        y_test = np.asarray(data.test[1])
        tmodel.eval()
        correct = 0
        with torch.no_grad():
            for lo in range(0, len(y_test), 500):
                logits = tmodel(torch.from_numpy(x_test[lo : lo + 500]))
                correct += int((logits.argmax(1).numpy() == y_test[lo : lo + 500]).sum())
        out["torch"]["test_error"] = 1.0 - correct / len(y_test)
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
    parser.add_argument(
        "--crossed_seed", type=int, default=None,
        help="instead: the CIFAR-10 constant-depth run of this seed, both frameworks on one "
        "framework's draws (see crossed_run)",
    )  # fmt: skip
    parser.add_argument("--crossed_draws", choices=("sdjax", "torch"), default="torch")
    parser.add_argument(
        "--crossed_frameworks", default="sdjax,torch", help="comma-separated: sdjax, torch"
    )
    parser.add_argument("--data_dir", default=None, help="crossed: tfds data dir")
    args = parser.parse_args(argv)
    if args.crossed_seed is not None:
        return _crossed_main(args)
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


def _crossed_main(args) -> dict[str, Any]:
    """`--crossed_seed`: one `crossed_run`, printed and written to `--out` with provenance."""
    frameworks = tuple(f for f in args.crossed_frameworks.split(",") if f)
    result = crossed_run(args.crossed_seed, args.crossed_draws, args.data_dir, args.depth,
                         frameworks=frameworks)  # fmt: skip
    print(json.dumps({fw: {k: v for k, v in result[fw].items() if k != "step_losses"}
                      for fw in frameworks}, indent=1))  # fmt: skip
    if args.out:
        from experiments import common

        prov = common.provenance()
        prov["versions"].update(common.versions(("torch", "tensorflow-datasets")))
        common.write_json(args.out, {**result, "provenance": prov})
    return result


if __name__ == "__main__":
    main()
