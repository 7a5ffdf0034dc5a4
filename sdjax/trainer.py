"""Checks a run, then builds everything it needs, once, before anything compiles.

:func:`check` looks at a config without loading data or compiling: its fields, the process
set-up, the model's own fields, the dataset on disk and its classes, the batch sizes vs the
devices and the images vs the model (``jax.eval_shape``, nothing computed). :func:`build` runs
:func:`check`, then turns the config and a workdir into a :class:`Trainer`: the data, the model,
the optimizer, the mesh, the train state (restored from ``workdir/checkpoints`` when there is
one), the jitted train and eval steps and the checkpointer. Before the first ``jax.jit`` call it
also compares the latest checkpoint with this run (model, parameter shapes, step,
trajectory-changing config fields; metadata only) and last checks that the workdir is writable.
A failed check raises one ``ValueError`` naming the field, the value and the allowed values,
and leaves the workdir as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import checkpoint as checkpoint_lib
from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import models, optim, runtime, steps

__all__ = ["Trainer", "build", "check", "create_model", "model_kwargs"]


@dataclasses.dataclass
class Trainer:
    """What :func:`build` makes for a run (see the module docstring).

    Attributes:
      state: the train state, replicated over ``mesh`` (restored when ``meta`` is not empty).
      meta: the restored checkpoint's bookkeeping (``{}`` for a fresh run).
      train_key: the run's train key (replicated); step ``s`` uses ``fold_in(train_key, s)``.
      train_fn / eval_fn: the jitted :func:`sdjax.steps.train_step` / ``eval_step``.
      batch_sharding: the ``"data"``-sharded layout of global batches.
    """

    config: ml_collections.ConfigDict
    workdir: str
    data: Any
    model: Any
    mesh: Any
    state: steps.TrainState
    meta: dict[str, Any]
    train_key: jax.Array
    train_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    batch_sharding: NamedSharding
    checkpointer: checkpoint_lib.Checkpointer
    total_steps: int
    steps_per_epoch: int

    @property
    def start_step(self) -> int:
        return int(jax.device_get(self.state.step))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments for ``sdjax.models.create`` from ``config.model`` (+ dtype).

    With ``drop_mode="row_subset"`` and no ``drop_shards`` in the config, ``drop_shards`` is the
    number of devices the batch is sharded over (``jax.device_count()``), so that every device
    draws its subset from its own samples.
    """
    kwargs = dict(config.model.to_dict())
    if config.train.half_precision:
        kwargs["dtype"] = jnp.bfloat16
    if kwargs.get("drop_mode") == "row_subset" and "drop_shards" not in kwargs:
        kwargs["drop_shards"] = jax.device_count()
    return kwargs


def create_model(config: ml_collections.ConfigDict):
    """``sdjax.models.create`` with ``config.model``; a model's ValueError names the field.

    Raises:
      ValueError: ``config.model.<field>: <the model's message>`` (unknown name or field, or a
        value the model rejects).
    """
    kwargs = model_kwargs(config)
    name = kwargs.pop("name")
    if name not in models.names():
        raise ValueError(
            f"config.model.name={name!r} is invalid; allowed: one of {list(models.names())}."
        )
    try:
        return models.create(name, **kwargs)
    except (TypeError, ValueError) as e:
        message = str(e)
        found = re.match(r"\w+: (\w+)", message)
        field = found.group(1) if found and found.group(1) in kwargs else None
        where = f"config.model.{field}={kwargs[field]!r}" if field else "config.model"
        raise ValueError(f"{where} is invalid: {message}") from None


def _total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.train.num_train_steps > 0:
        return int(config.train.num_train_steps)
    return max(int(round(config.train.num_epochs * steps_per_epoch)), 1)


def _check_data(config: ml_collections.ConfigDict, info: Any, devices: int | None = None) -> None:
    devices = jax.device_count() if devices is None else devices
    for field in ("batch_size", "eval_batch_size"):
        value = config.train[field]
        if value % devices:
            raise ValueError(
                f"config.train.{field}={value!r} is invalid; allowed: a multiple of the number "
                f"of devices ({devices}), e.g. {max(devices, value // devices * devices)}."
            )
    if info.num_classes != config.model.num_classes:
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes!r} is invalid; allowed: "
            f"{info.num_classes} (the number of classes of {config.input.dataset})."
        )
    if info.num_train - config.input.validation_size < config.train.batch_size:
        raise ValueError(
            f"config.input.validation_size={config.input.validation_size!r} is invalid; allowed: "
            f"at most {info.num_train - config.train.batch_size} so that one training batch of "
            f"{config.train.batch_size} remains ({info.num_train} train examples)."
        )
    train_size = int(config.input.get("train_size", 0))
    available = info.num_train - config.input.validation_size
    if train_size and not config.train.batch_size <= train_size <= available:
        raise ValueError(
            f"config.input.train_size={train_size!r} is invalid; allowed: 0 (all) or "
            f"{config.train.batch_size} (one batch) ... {available} (the examples left after "
            f"the validation hold-out of {config.input.validation_size})."
        )
    remainder = (train_size or available) % config.train.batch_size
    if not config.input.get("drop_remainder", True) and remainder % devices:
        raise ValueError(
            f"config.input.drop_remainder=False is invalid here: each epoch would end with a "
            f"batch of {remainder} examples, not a multiple of the number of devices "
            f"({devices}); allowed: True, or a batch size or validation size that leaves a "
            "multiple of the device count."
        )


def _abstract_state(config, model, image_shape, tx, init_key, sharding):
    """The train state's structure (``jax.eval_shape``: nothing computed or compiled)."""
    init = functools.partial(steps.create_train_state, config, model, image_shape, tx=tx)
    try:
        abstract = jax.eval_shape(init, init_key)
    except Exception as e:  # the model's own message is kept
        raise ValueError(
            f"images of shape {tuple(image_shape)} from config.input.dataset="
            f"{config.input.dataset!r} do not fit config.model.name={config.model.name!r}: "
            f"{type(e).__name__}: {e}"
        ) from None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    return init, abstract


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def changed_fields(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list:
    """Dotted paths whose values differ between two config dicts (missing counts as differing)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of :func:`changed_fields` that change what is trained.

    Leaves out ``sdjax.config.HARMLESS_FIELDS``, and a field of ``sdjax.config.ADDED_FIELDS``
    that the saved config lacks while the current one holds the value it implied.
    """
    out = []
    for field in changed_fields(saved, current):
        if field in config_lib.HARMLESS_FIELDS:
            continue
        implied = config_lib.ADDED_FIELDS.get(field, "<none>")
        if _lookup(saved, field) == "<absent>" and _lookup(current, field) == implied:
            continue
        out.append(field)
    return out


def _check_checkpoint(config, checkpointer, abstract_state, total_steps) -> None:
    """Compares the latest checkpoint's metadata with this run before anything is restored."""
    step = checkpointer.latest_step()
    if step is None:
        return
    meta = checkpointer.check(abstract_state, step)
    where = os.path.join(checkpointer.directory, str(step))
    if step > total_steps:
        raise ValueError(
            f"checkpoint {where} is at step {step}, beyond this run's {total_steps} steps "
            "(config.train.num_train_steps / num_epochs); nothing was written. Pass at least "
            f"{step} steps to continue it, or use a new --workdir."
        )
    saved = meta.get("config")
    if saved is None or config.train.allow_config_change:
        return
    changed = trajectory_changes(saved, _json(config.to_dict()))
    if changed:
        details = ", ".join(
            f"{f}: {_lookup(saved, f)!r} -> {_lookup(_json(config.to_dict()), f)!r}"
            for f in changed
        )
        raise ValueError(
            f"checkpoint {where} was written with a different config ({details}); resuming would "
            "not continue its trajectory, so nothing was loaded. Use the saved config "
            "(config.json), a new --workdir, or pass --config.train.allow_config_change=True."
        )


def _lookup(tree: dict[str, Any], field: str) -> Any:
    try:
        return config_lib.get_field(tree, field)
    except (KeyError, TypeError):
        return "<absent>"


def check(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    device_count: int | None = None,
) -> Any:
    """Checks ``config`` without loading the data or compiling anything (the module docstring).

    Args:
      config: see ``sdjax.config.default_config``.
      workdir: if given, it must exist or be creatable, and be writable. Its checkpoint is
        compared with the run by :func:`build`, which knows the run's length.
      device_count: check the batch sizes for this many devices instead of this process's
        ``jax.device_count()``; the process set-up (``sdjax.runtime.check_ready``) is then not
        checked (the config is meant for another machine).

    Returns:
      The model (:func:`create_model`), checked against the dataset's images; :func:`build`
      trains this object.

    Raises:
      ValueError: naming the field, the value and the allowed values.
    """
    config_lib.validate_fields(config)
    if device_count is None:
        runtime.check_ready(config)
    model = create_model(config)
    info = data_lib.check_available(config.input)
    _check_data(config, info, device_count)
    tx = optim.create(config.optim, 1, 1)  # the state's shapes do not depend on the schedule
    _abstract_state(config, model, info.image_shape, tx, _keys(config)[0], None)
    if workdir is not None:
        config_lib.validate_workdir(workdir)
    return model


def _keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """The run's init key and train key, both from ``config.seed``."""
    seed_key = jax.random.key(config.seed, impl=config.prng_impl)
    return jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1)


def build(config: ml_collections.ConfigDict, workdir: str) -> Trainer:
    """Runs :func:`check`, then builds everything for ``config`` (see the module docstring).

    The process must have been set up for the config (``sdjax.runtime.setup``, which
    ``python -m sdjax.main`` calls) when it asks for CPU devices or ``jax.distributed``.

    Raises:
      ValueError: an invalid config field, a process not set up for it, a missing dataset,
        images that do not fit the model, an incompatible checkpoint or an unwritable workdir;
        raised before anything is compiled, the workdir left as it was.
    """
    model = check(config)
    data = data_lib.create(config.input)
    steps_per_epoch = data.steps_per_epoch(config.train.batch_size)
    total_steps = _total_steps(config, steps_per_epoch)
    tx = optim.create(config.optim, total_steps, steps_per_epoch)
    mesh = runtime.create_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    init_key, train_key = _keys(config)
    image_shape = tuple(data.info.image_shape)
    init, abstract = _abstract_state(config, model, image_shape, tx, init_key, replicated)
    directory, model_config = os.path.join(workdir, "checkpoints"), _json(config.model.to_dict())
    if os.path.isdir(directory):
        reader = checkpoint_lib.Checkpointer(directory, 1, model_config, create=False)
        try:
            _check_checkpoint(config, reader, abstract, total_steps)
        finally:
            reader.close()
    if jax.process_count() > 1:  # every host looked at the workdir before anyone writes to it
        multihost_utils.sync_global_devices("sdjax.trainer.build: checked")
    config_lib.validate_workdir(workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        directory, config.train.keep_checkpoints, model_config
    )

    # Checked: from here on, compile.
    meta: dict[str, Any] = {}
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(abstract)
    else:
        state = jax.jit(init, out_shardings=replicated)(init_key)
    # Not device_put: with several hosts the replicated sharding is not fully addressable.
    train_key = jax.jit(lambda key: key, out_shardings=replicated)(train_key)
    augment_kwargs = data.augment_kwargs()
    fraction = config.train.drop_warmup_fraction
    train_fn = jax.jit(
        functools.partial(
            steps.train_step,
            augment_kwargs=augment_kwargs,
            num_classes=config.model.num_classes,
            label_smoothing=config.optim.label_smoothing,
            ema_decay=config.optim.ema_decay,
            block_gates=_block_gates_fn(model),
            drop_warmup_steps=fraction * total_steps if fraction > 0 else 0.0,
        ),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(
            steps.eval_step,
            augment_kwargs=augment_kwargs,
            num_classes=config.model.num_classes,
            use_ema=config.optim.ema_decay > 0,
        ),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )
    return Trainer(
        config=config,
        workdir=workdir,
        data=data,
        model=model,
        mesh=mesh,
        state=state,
        meta=meta,
        train_key=train_key,
        train_fn=train_fn,
        eval_fn=eval_fn,
        batch_sharding=batch_sharding,
        checkpointer=checkpointer,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )


def _block_gates_fn(model) -> Callable[..., jax.Array] | None:
    """``batch_gates`` of ``model`` when it trains with batch-mode stochastic depth, else None."""
    if model.drop_mode != "batch" or max(model.effective_block_rates()) <= 0:
        return None
    return functools.partial(models.batch_gates, model)
