"""Process set-up for a training run: host allocator, CPU device count, multi-host, mesh.

These settings are process-wide, and most of them only take effect before JAX starts its
backend, so they belong to the entry point (``python -m sdjax.main`` calls :func:`setup` first)
and never to a library function a notebook may call. :func:`check_ready` is what the trainer
calls instead: it changes nothing and raises one clear error when the process does not match
what the config asks for.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sdjax import host_malloc

__all__ = [
    "check_ready",
    "configure_cpu_devices",
    "create_mesh",
    "host_malloc_applied",
    "maybe_initialize_distributed",
    "request_cpu_devices",
    "setup",
]

_applied: dict[str, bool] = {}


def _check_host_malloc(value: Any) -> None:
    if not isinstance(value, str) or value not in host_malloc.MODES:
        raise ValueError(
            f"config.train.host_malloc={value!r} is invalid; allowed: one of "
            f"{', '.join(host_malloc.MODES)}."
        )


def host_malloc_applied() -> bool | None:
    """Whether :func:`setup` applied the allocator settings (None: setup was not called)."""
    return _applied.get("host_malloc")


def request_cpu_devices(count: int) -> bool:
    """Asks JAX to split its CPU backend into ``count`` devices (``jax_num_cpu_devices``).

    Returns False, changing nothing, when JAX has already initialized its backends (the
    setting only takes effect before that); touches no device itself.
    """
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return False
    return True


def configure_cpu_devices(config: Any) -> None:
    """Splits the CPU backend into ``config.train.num_cpu_devices`` devices (0: leave it alone).

    Raises:
      ValueError: the CPU backend of this process is already initialized with another count.
    """
    n = config.train.get("num_cpu_devices", 0)
    if n and not request_cpu_devices(n):
        _check_cpu_devices(n)


def _check_cpu_devices(n: int) -> None:
    current = len(jax.devices("cpu"))
    if n and current != n:
        raise ValueError(
            f"config.train.num_cpu_devices={n}: the CPU backend of this process is already "
            f"initialized with {current} device(s); call sdjax.runtime.setup(config) in a fresh "
            "process before anything uses JAX (as `python -m sdjax.main` does), or set the "
            "field to 0 to keep the current devices."
        )


def maybe_initialize_distributed(config: Any) -> None:
    """Calls ``jax.distributed.initialize`` when ``config.train.distributed`` (multi-host).

    Must run before anything touches the devices. The coordinator fields are passed when set;
    otherwise JAX auto-detects them (Cloud TPU, SLURM, ...). A second call is a no-op.
    """
    if not config.train.distributed or jax.distributed.is_initialized():
        return
    kwargs = {
        "coordinator_address": config.train.coordinator_address,
        "num_processes": config.train.num_processes,
        "process_id": config.train.process_id,
    }
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def setup(config: Any) -> bool:
    """Prepares this process for ``config``: allocator, CPU device count, ``jax.distributed``.

    Call it once, first, in a fresh process (before anything uses JAX).

    Returns:
      Whether the host allocator settings were applied (see ``sdjax.host_malloc.configure``).

    Raises:
      ValueError: ``train.host_malloc`` is not a valid mode, or JAX already runs with another
        CPU device count.
    """
    mode = config.train.get("host_malloc", "auto")
    _check_host_malloc(mode)
    _applied["host_malloc"] = host_malloc.configure(mode)
    configure_cpu_devices(config)
    maybe_initialize_distributed(config)
    return _applied["host_malloc"]


def check_ready(config: Any) -> None:
    """Raises one clear ValueError when this process was not set up for ``config``.

    Changes nothing: checks ``train.host_malloc``, that the CPU device count is the requested
    one and that ``jax.distributed`` is initialized when ``train.distributed`` asks for it.
    """
    _check_host_malloc(config.train.get("host_malloc", "auto"))
    _check_cpu_devices(config.train.get("num_cpu_devices", 0))
    if config.train.distributed and not jax.distributed.is_initialized():
        raise ValueError(
            "config.train.distributed=True but jax.distributed is not initialized; call "
            "sdjax.runtime.setup(config) first (as `python -m sdjax.main` does)."
        )


def create_mesh() -> Mesh:
    """A 1-D mesh over all (global) devices with the axis name ``"data"``."""
    return Mesh(np.asarray(jax.devices()), ("data",))
