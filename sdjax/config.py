"""The training config: its schema, config argument strings and per-field checks.

Every hyperparameter of a run lives in one ``ml_collections.ConfigDict``. :func:`default_config`
is the schema with its defaults (each field documented by the comment beside it); the files in
``configs/`` start from it, or from a sibling config (:func:`sibling_config`), and set only what
their experiment changes. :func:`apply_arg` applies a config argument string
(``--config=configs/cifar10_sd.py:final_drop_rate=0.3,mode=batch``) and :func:`validate_fields`
checks each field on its own (types and ranges), raising one ``ValueError`` that names the
field, the bad value and the allowed values.

This module is data: it imports no JAX, no models and no data code. Checks that need the real
objects (a model name and its fields, the dataset on disk, image shapes, batch size vs devices,
checkpoints) run once in :func:`sdjax.trainer.check` and :func:`sdjax.trainer.build`; the model
validates its own fields (drop rate, schedule, mode) when it is constructed.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = [
    "ALIASES",
    "ADDED_FIELDS",
    "HARMLESS_FIELDS",
    "LR_SCHEDULES",
    "NORMALIZATIONS",
    "OPTIMIZERS",
    "PRNG_IMPLS",
    "RECIPES",
    "apply_arg",
    "apply_recipe",
    "default_config",
    "get_field",
    "parse_arg",
    "validate_fields",
    "validate_workdir",
]

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
LR_SCHEDULES = ("step", "epoch_step", "cosine", "exponential", "constant")
NORMALIZATIONS = ("per_channel", "pixel_mean_global_std")
WARMUP_TYPES = ("linear", "constant")
WEIGHT_DECAY_ON = ("all", "kernels")
# The positive normal range of float32 (numpy.finfo(numpy.float32).tiny / .max): a learning rate
# outside it becomes 0 or inf in the float32 optimizer state.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38

RECIPES = ("paper", "sdjax")
PAPER_VALIDATION_SIZE = {"cifar10": 5000, "cifar100": 5000, "svhn_cropped": 6000}


def recipe_fields(recipe: str, dataset: str) -> dict[str, Any]:
    """The fields where the paper's Torch code and sdjax's earlier recipe differ, by dotted path.

    ``"paper"`` follows ``main.lua`` / ``cifar-dataset.lua`` / ``svhn-dataset.lua`` /
    ``ResidualDrop.lua``: a validation hold-out (5,000 CIFAR images; 6,000 SVHN images) and test
    error at the best validation epoch, a mean image and one global std, the last partial batch
    kept, learning-rate drops by epoch, stride-2 convolutions padded 1/1, Kaiming fan-in convs,
    Torch's ``nn.Linear`` init and ``cudnn.SpatialBatchNormalization``'s uniform scale init.
    ``"sdjax"``: all 50k images train (no validation), per-channel mean/std, the remainder
    dropped, drops by step, "SAME" padding, He fan-out, flax's ``Dense`` and a scale of 1.

    Raises:
      ValueError: an unknown recipe.
    """
    if recipe not in RECIPES:
        _fail("recipe", recipe, f"one of {list(RECIPES)}")
    paper = recipe == "paper"
    return {
        "input.validation_size": PAPER_VALIDATION_SIZE.get(dataset, 0) if paper else 0,
        "input.normalization": "pixel_mean_global_std" if paper else "per_channel",
        "input.drop_remainder": not paper,
        "optim.lr_schedule": "epoch_step" if paper else "step",
        "model.conv_padding": "symmetric" if paper else "same",
        "model.conv_init": "he_fan_in" if paper else "he_fan_out",
        "model.head_init": "torch_linear" if paper else "lecun_normal",
        "model.bn_scale_init": "uniform" if paper else "ones",
    }


def apply_recipe(config: ml_collections.ConfigDict, recipe: str) -> ml_collections.ConfigDict:
    """Sets :func:`recipe_fields` of ``recipe`` for ``config.input.dataset``; returns ``config``.

    The model fields are those of ``sdjax.models.CifarResNet``.
    """
    for path, value in recipe_fields(recipe, config.input.dataset).items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


ADDED_FIELDS = {
    "input.normalization": "per_channel",
    "input.drop_remainder": True,
    "input.train_size": 0,
    "optim.adam_b1": 0.9,
    "optim.adam_b2": 0.999,
    "optim.adam_eps": 1e-8,
    "model.conv_padding": "same",
    "model.conv_init": "he_fan_out",
    "model.head_init": "lecun_normal",
    "model.bn_scale_init": "ones",
}
"""Fields added with the paper's recipe, and what a saved config written before them trained
with: a checkpoint whose config lacks one resumes when the current value is this one."""

HARMLESS_FIELDS = (
    "input.data_dir",
    "input.npz_path",
    "train.allow_config_change",
    "train.checkpoint_every_steps",
    "train.coordinator_address",
    "train.distributed",
    "train.eval_batch_size",
    "train.host_malloc",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.num_cpu_devices",
    "train.num_processes",
    "train.process_id",
    "train.progress_bar",
    "train.tensorboard",
)
"""Fields a resumed run may change without ``train.allow_config_change``: they change where the
data is read from, how often metrics and checkpoints are written, or how the work is spread over
devices (a different device count only reorders float sums), never what is trained."""


def default_config() -> ml_collections.ConfigDict:
    """Returns the config schema with defaults (the paper's CIFAR-10 setup where one applies).

    Each field is documented by the comment beside it. ``model.*`` fields not set here keep the
    model's own default (e.g. ``scan_blocks``, ``remat``, ``conv_impl``); a config file or a
    dotted argument (``model.scan_blocks=false``) may add them, and the model validates them.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameters, data order, augmentation and drop gates
    c.prng_impl = "threefry2x32"  # the typed keys' PRNG implementation, one of PRNG_IMPLS

    # Passed to sdjax.models.create (with dtype from train.half_precision): the paper's
    # stochastic-depth fields; other model fields keep the model's defaults.
    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet110"  # a name from sdjax.models.names()
    c.model.num_classes = 10
    c.model.final_drop_rate = 0.5
    c.model.drop_schedule = "linear"
    c.model.drop_mode = "batch"
    c.model.scale_by_keep = False

    c.input = ml_collections.ConfigDict()
    # digits | cifar10 | cifar100 | svhn_cropped | imagenet2012 | synthetic
    c.input.dataset = "cifar10"
    # TFDS data directory; None -> $TFDS_DATA_DIR -> the tfds default.
    c.input.data_dir = ml_collections.config_dict.placeholder(str)
    # None (tfds), or a .npz export of the dataset (python -m sdjax.data.npz_export; keys
    # train_images, train_labels, test_images, test_labels) read with NumPy alone: no TensorFlow
    # is imported. train_split / test_split must then be train / test.
    c.input.npz_path = ml_collections.config_dict.placeholder(str)
    c.input.train_split = "train"  # TFDS split strings (slices like test[:256] work)
    c.input.test_split = "test"
    c.input.use_extra = False  # SVHN only: add the 531k `extra` images to the training set
    # Training examples held out for validation (the last ones of a fixed permutation seeded
    # with split_seed); 0 = no validation split. The paper's code: 5000 of CIFAR's 50k.
    c.input.validation_size = 0
    # Train on this many of the examples left after the hold-out (the first ones of the same
    # permutation: a subset fixed by split_seed, the same for every seed); 0 = all of them. The
    # normalisation statistics come from this subset; validation and test are unchanged.
    c.input.train_size = 0
    # crop_padding: zero padding (after normalisation) before the random crop; flip: random
    # horizontal flips.
    c.input.augment = ml_collections.ConfigDict({"crop_padding": 4, "flip": True})
    # Normalise the images (statistics of the training part, after the hold-out); False feeds
    # the raw values.
    c.input.normalize = True
    # "per_channel" (a mean and a std per channel) or "pixel_mean_global_std" (the paper's code:
    # a mean image [H, W, C] and one std of all values, ddof=1 as Torch's std()).
    c.input.normalization = "per_channel"
    # True drops the last N % batch_size examples of each epoch's permutation (N // batch_size
    # steps per epoch, one compiled step); False keeps them as a last, smaller batch
    # (ceil(N / batch_size) steps, as the paper's code; the partial batch compiles the step a
    # second time, and its size must be a multiple of the device count).
    c.input.drop_remainder = True
    # ImageNet crop size (streamed datasets only; None = native size).
    c.input.image_size = ml_collections.config_dict.placeholder(int)
    c.input.digits_test_size = 360  # the fixed stratified digits test split
    c.input.split_seed = 0  # seeds the digits test split and the validation hold-out
    c.input.synthetic_image_shape = (32, 32, 3)  # the synthetic dataset's shape and size
    c.input.synthetic_num_train = 1024
    c.input.synthetic_num_test = 256
    c.input.synthetic_num_classes = 10
    c.input.shuffle_buffer = 16384  # tf.data shuffle buffer (streamed datasets only)

    # See sdjax.optim.create.
    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "sgd"
    c.optim.learning_rate = 0.1  # within float32's positive normal range
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.weight_decay_on = "all"
    # "step" drops at fractions `boundaries` of the steps; "epoch_step" drops by epoch as the
    # paper's code (1-based epoch e trains at learning_rate * decay_factor ** #{b : e >= b *
    # num_epochs}).
    c.optim.lr_schedule = "step"
    c.optim.boundaries = (0.5, 0.75)
    c.optim.decay_factor = 0.1
    c.optim.decay_epochs = 2.4
    c.optim.warmup_epochs = 0.0
    c.optim.warmup_steps = 0
    c.optim.warmup_type = "linear"
    c.optim.warmup_factor = 0.1
    c.optim.rmsprop_decay = 0.9
    c.optim.rmsprop_eps = 1e-3
    c.optim.adam_b1 = 0.9
    c.optim.adam_b2 = 0.999
    c.optim.adam_eps = 1e-8
    c.optim.ema_decay = 0.0
    c.optim.label_smoothing = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global batch size (divisible by jax.device_count())
    c.train.eval_batch_size = 500  # global eval batch size (divisible by the device count)
    c.train.num_epochs = 500
    c.train.num_train_steps = -1  # > 0 overrides num_epochs
    c.train.eval_every_epochs = 1  # evaluate (validation and test) every this many epochs
    c.train.checkpoint_every_steps = 1000  # periodic saves (also at epoch ends)
    c.train.keep_checkpoints = 3
    # Train metrics cadence (also when the loss and the new state are checked for NaN/inf).
    c.train.log_every_steps = 50
    c.train.half_precision = False  # bf16 compute (params and optimizer stay float32)
    # In [0, 1): the drop rates ramp linearly from 0 to their configured values over this
    # fraction of the total steps (0 = no warm-up).
    c.train.drop_warmup_fraction = 0.0
    # Resume a checkpoint although fields that change the trajectory (all but HARMLESS_FIELDS)
    # differ from the config saved with it.
    c.train.allow_config_change = False
    # Call jax.distributed.initialize (multi-host); the coordinator fields are passed to it
    # when set (else auto-detected on TPU/SLURM).
    c.train.distributed = False
    c.train.coordinator_address = ml_collections.config_dict.placeholder(str)
    c.train.num_processes = ml_collections.config_dict.placeholder(int)
    c.train.process_id = ml_collections.config_dict.placeholder(int)
    c.train.progress_bar = True  # show a progress bar (only on an interactive terminal)
    # Also write TensorBoard events (needs clu and TensorFlow); False writes only metrics.jsonl
    # and the log, so that a run on input.npz_path imports no TensorFlow.
    c.train.tensorboard = True
    # 0 leaves JAX's CPU device count alone (1 unless JAX_NUM_CPU_DEVICES says otherwise);
    # n > 0 splits the CPU backend into n devices (sdjax.runtime.setup, before JAX initializes)
    # and training runs data-parallel over them. Only the CPU backend is affected.
    c.train.num_cpu_devices = 0
    # "auto" | "reuse" | "system": the host allocator setting sdjax.runtime.setup applies (see
    # sdjax.host_malloc).
    c.train.host_malloc = "auto"
    return c


def sibling_config(config_file: str, name: str, arg: str | None = None):
    """``get_config(arg)`` of the config file ``<name>.py`` in the folder of ``config_file``.

    Config files are not a package; a derived config loads the one it derives from by path::

        config = sibling_config(__file__, "cifar10_sd")
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"sdjax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


ALIASES = {
    "model": "model.name",
    "final_drop_rate": "model.final_drop_rate",
    "schedule": "model.drop_schedule",
    "mode": "model.drop_mode",
    "dataset": "input.dataset",
    "data_dir": "input.data_dir",
    "npz_path": "input.npz_path",
    "validation_size": "input.validation_size",
    "train_size": "input.train_size",
    "lr": "optim.learning_rate",
    "batch_size": "train.batch_size",
    "epochs": "train.num_epochs",
    "steps": "train.num_train_steps",
    "half_precision": "train.half_precision",
    "seed": "seed",
    "prng_impl": "prng_impl",
}


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses a config argument string ``"key=value,key2=value2"`` into a dict of strings.

    Raises:
      ValueError: for an item without ``=`` or an empty key.
    """
    if not arg:
        return {}
    out = {}
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"config argument {item!r} is not key=value; expected e.g. "
                "'configs/cifar10_sd.py:final_drop_rate=0.3,mode=batch'."
            )
        out[key.strip()] = value.strip()
    return out


def _convert(text: str, old: Any, field: str) -> Any:
    """``text`` converted to the type of the current value ``old`` of ``field``."""
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config argument {field}={text!r}: expected true or false.")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ValueError(
            f"config argument {field}={text!r}: expected a {type(old).__name__}."
        ) from None
    if isinstance(old, tuple):
        return tuple(_convert(t, old[0], field) for t in text.split(";")) if old else ()
    if text.lower() == "none":
        return None
    return text


def _literal(text: str) -> Any:
    """A new model field's value: true/false, a number, a ``;``-separated tuple, or the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if ";" in text:
        return tuple(_literal(t) for t in text.split(";"))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_arg(
    config: ml_collections.ConfigDict, arg: str | None, aliases: Mapping[str, str] | None = None
) -> ml_collections.ConfigDict:
    """Applies a config argument string to ``config`` in place and returns it.

    ``recipe=paper`` or ``recipe=sdjax`` first sets that recipe's fields (:func:`apply_recipe`),
    wherever it stands in the string; the other keys then apply on top of it.

    Keys are short aliases (``aliases`` maps them to dotted config paths, default
    :data:`ALIASES`, e.g. ``final_drop_rate`` -> ``model.final_drop_rate``, ``mode`` ->
    ``model.drop_mode``, ``steps`` -> ``train.num_train_steps``) or full dotted paths
    (``train.num_epochs``). Values are converted to the type of the current value (bool:
    true/false; tuples: ``;`` separated). A ``model.X`` path that the config does not set yet
    adds the model field ``X`` (the model checks its name and value).

    Raises:
      ValueError: an unknown key (the message lists the valid short keys) or a value that does
        not convert to the field's type.
    """
    aliases = ALIASES if aliases is None else aliases
    items = parse_arg(arg)
    if "recipe" in items and "recipe" not in aliases:
        apply_recipe(config, items.pop("recipe"))
    for key, text in items.items():
        path = aliases.get(key, key)
        *parents, leaf = path.split(".")
        node = config
        try:
            for p in parents:
                node = node[p]
            if parents == ["model"] and leaf not in node:
                node[leaf] = _literal(text)
                continue
            old = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise ValueError(
                f"unknown config argument {key!r}; valid keys: {sorted(aliases)} "
                "or any dotted config path such as train.num_epochs."
            ) from None
        node[leaf] = _convert(text, old, key)
    return config


def get_field(config: Any, field: str) -> Any:
    """The value at the dotted path ``field`` of ``config`` (a ConfigDict or a nested dict)."""
    node = config
    for p in field.split("."):
        node = node[p]
    return node


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.{field}={value!r} is invalid; allowed: {allowed}.")


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: tuple) -> None:
    value = get_field(config, field)
    if value not in choices:
        _fail(field, value, f"one of {list(choices)}")


def _check_number(
    config, field, *, low=None, high=None, low_open=False, high_open=False, integer=False
) -> None:
    value = get_field(config, field)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
        value, bool
    )
    if ok and not integer:
        ok = not math.isnan(value) and not math.isinf(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        _fail(field, value, f"{kind} {' and '.join(s for s in (lo, hi) if s) or 'finite'}")


def validate_fields(config: ml_collections.ConfigDict) -> None:
    """Checks every field that can be judged on its own: names, types and ranges.

    Model fields are checked by the model when it is built and the dataset name by
    ``sdjax.data`` (see the module docstring).

    Raises:
      ValueError: naming the field, the value and the allowed values.
    """
    _check_number(config, "seed", low=0, integer=True)
    _check_choice(config, "prng_impl", PRNG_IMPLS)
    if not isinstance(config.model.get("name"), str):
        _fail("model.name", config.model.get("name"), "a model name (sdjax.models.names())")

    _check_number(config, "input.validation_size", low=0, integer=True)
    _check_number(config, "input.train_size", low=0, integer=True)
    _check_number(config, "input.augment.crop_padding", low=0, integer=True)
    _check_choice(config, "input.normalization", NORMALIZATIONS)
    if not isinstance(config.input.drop_remainder, bool):
        _fail("input.drop_remainder", config.input.drop_remainder, "True or False")
    npz_path = config.input.get("npz_path")
    if npz_path is not None and not (isinstance(npz_path, str) and npz_path.endswith(".npz")):
        _fail("input.npz_path", npz_path, "None (tfds) or the path of a .npz file")

    _check_choice(config, "optim.optimizer", OPTIMIZERS)
    _check_choice(config, "optim.lr_schedule", LR_SCHEDULES)
    _check_choice(config, "optim.warmup_type", WARMUP_TYPES)
    _check_choice(config, "optim.weight_decay_on", WEIGHT_DECAY_ON)
    _check_number(config, "optim.learning_rate", low=FLOAT32_TINY, high=FLOAT32_MAX)
    _check_number(config, "optim.momentum", low=0, high=1, high_open=True)
    _check_number(config, "optim.weight_decay", low=0)
    _check_number(config, "optim.decay_factor", low=0, low_open=True)
    _check_number(config, "optim.ema_decay", low=0, high=1, high_open=True)
    _check_number(config, "optim.label_smoothing", low=0, high=1, high_open=True)
    _check_number(config, "optim.warmup_epochs", low=0)
    _check_number(config, "optim.warmup_steps", low=0, integer=True)
    bounds = tuple(config.optim.boundaries)
    if any(not 0 < b < 1 for b in bounds) or list(bounds) != sorted(bounds):
        _fail("optim.boundaries", bounds, "increasing fractions of training in (0, 1)")

    for field in ("batch_size", "eval_batch_size", "eval_every_epochs", "log_every_steps"):
        _check_number(config, f"train.{field}", low=1, integer=True)
    _check_number(config, "train.checkpoint_every_steps", low=1, integer=True)
    _check_number(config, "train.keep_checkpoints", low=1, integer=True)
    _check_number(config, "train.num_epochs", low=0, low_open=True)
    _check_number(config, "train.num_train_steps", low=-1, integer=True)
    if config.train.num_train_steps == 0:
        _fail("train.num_train_steps", 0, "-1 (use num_epochs) or a positive integer")
    _check_number(config, "train.drop_warmup_fraction", low=0, high=1, high_open=True)
    value = config.train.get("num_cpu_devices", 0)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        _fail("train.num_cpu_devices", value, "an integer >= 0 (0: JAX's default device count)")


def validate_workdir(workdir: str) -> None:
    """Checks that ``workdir`` exists or can be created, and is writable.

    Creates the directory (and parents) if missing; writes and removes a temporary file.

    Raises:
      ValueError: naming the workdir and the OS error.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ValueError(
            f"workdir {workdir!r} is not writable ({e.strerror or e}); pass --workdir=DIR with a "
            "directory you can write to."
        ) from None
