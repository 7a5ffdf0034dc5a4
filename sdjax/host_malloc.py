"""Host allocator settings that stop XLA:CPU from page-faulting its buffers on every step.

XLA:CPU allocates a step's temporary buffer (hundreds of MB for a CIFAR ResNet at batch 128)
and its large outputs with ``malloc`` and frees them when the step ends. glibc hands
requests above its mmap threshold (at most 32 MB by default), and any request above 64 MB made
from a thread other than the main one, to ``mmap``, and returns them to the kernel on ``free``:
every step then touches fresh pages, and the kernel zero-fills each 4 KB page on a fault.

``configure("reuse")`` calls glibc's ``mallopt`` so that every block comes from one heap and
stays there after ``free``: ``M_ARENA_MAX=1`` (one arena for all threads), ``M_MMAP_MAX=0``
(never ``mmap`` a block; a request that a thread's arena cannot hold is retried in the main heap)
and ``M_TRIM_THRESHOLD=-1`` (never give the top of the heap back). The next step reuses the
same, already mapped, memory. The costs: the process keeps its peak heap mapped (as PyTorch's
caching allocators do), which may grow to a few times one step's buffers while the heap settles
over the first steps (a block finds no hole yet while JAX frees the previous step's buffers
asynchronously), and all threads share one malloc arena. It affects the whole process and
works best before JAX initializes its backend (XLA's threads pick their malloc arena when they
first allocate); it is what ``python -m sdjax.main`` does by default on CPU
(``train.host_malloc``), and what a user of the layers can call at the top of their own script.
No randomness is involved.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys

__all__ = ["MODES", "configure"]

MODES = ("auto", "reuse", "system")
"""Valid values of `configure`'s ``mode`` (and of the config field ``train.host_malloc``)."""

# <malloc.h> parameter numbers (glibc).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD = -1: never give the top of the heap back (mallopt(3))

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def _glibc():
    """The process's glibc as a `ctypes.CDLL`, or None (not Linux, or another libc)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return libc


def _runs_on_cpu() -> bool:
    """Whether JAX will (most likely) compute on the CPU, decided without starting a backend.

    True when ``JAX_PLATFORMS`` / ``jax_platforms`` names ``cpu`` first, or when it is unset
    and no GPU/TPU plugin is installed.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def configure(mode: str = "auto") -> bool:
    """Applies the allocator setting ``mode`` to this process.

    Args:
      mode: ``"reuse"`` (the ``mallopt`` settings of the module docstring), ``"system"``
        (change nothing) or ``"auto"`` (``"reuse"`` when JAX will run on the CPU, see
        `_runs_on_cpu`, else nothing: on GPU/TPU hosts the step buffers live on the device).

    Returns:
      True if the settings were applied, False if nothing changed (``"system"``, ``"auto"``
      on an accelerator host, or a platform without glibc, e.g. macOS, where ``"reuse"`` is a
      no-op).

    Raises:
      ValueError: ``mode`` is not one of `MODES`.
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"host_malloc.configure: mode={mode!r} is not valid; allowed values: {', '.join(MODES)}"
        )
    if mode == "system" or (mode == "auto" and not _runs_on_cpu()):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for param, value in (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _NEVER),
    ):
        ok = bool(libc.mallopt(param, value)) and ok
    return ok
