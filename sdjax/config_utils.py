"""Deprecated alias of :mod:`sdjax.config` (the config schema, argument strings, field checks).

Kept so that config files and scripts written against it keep working; new code imports
``sdjax.config``. :func:`validate` runs the checks ``sdjax.trainer.build`` runs before compiling,
without building the data or the train state when ``check_data=False``.
"""

from __future__ import annotations

from typing import Any

from sdjax.config import (
    ALIASES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRNG_IMPLS,
    apply_arg,
    default_config,
    parse_arg,
    validate_fields,
    validate_workdir,
)

__all__ = [
    "ALIASES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRNG_IMPLS",
    "apply_arg",
    "default_config",
    "model_kwargs",
    "parse_arg",
    "validate",
    "validate_workdir",
]


def model_kwargs(config: Any) -> dict[str, Any]:
    """Alias of ``sdjax.trainer.model_kwargs``."""
    from sdjax import trainer  # noqa: PLC0415

    return trainer.model_kwargs(config)


def validate(
    config: Any,
    workdir: str | None = None,
    *,
    check_data: bool = True,
    device_count: int | None = None,
) -> None:
    """Checks ``config`` without compiling: its fields, the model and, with ``check_data``, the
    dataset on disk, its classes and image shape and the batch sizes vs ``device_count``
    (default ``jax.device_count()``);
    ``workdir`` (if given) must be writable.

    Raises:
      ValueError: naming the field, the value and the allowed values.
    """
    import jax  # noqa: PLC0415

    from sdjax import data, optim, trainer  # noqa: PLC0415

    validate_fields(config)
    model = trainer.create_model(config)
    if check_data:
        info = data.check_available(config.input)
        trainer._check_data(config, info, device_count)
        tx = optim.create(config.optim, 1, 1)
        trainer._abstract_state(config, model, info.image_shape, tx, jax.random.key(0), None)
    if workdir is not None:
        validate_workdir(workdir)
