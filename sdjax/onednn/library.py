"""Builds and loads the oneDNN convolution handlers (``conv_ffi.cc``) as XLA FFI targets.

The shared library is compiled on demand with the host C++ compiler against oneDNN
(``dnnl.hpp`` / ``libdnnl.so``, e.g. Debian/Ubuntu ``apt-get install -y libdnnl-dev``) and
jaxlib's FFI headers (`jax.ffi.include_dir`), into a per-user cache directory keyed by a hash
of the source, the jaxlib version and the compiler command, so it is built once per
environment. Nothing here runs at import time.

Environment variables:
  SDJAX_CACHE_DIR: cache root (default ``$XDG_CACHE_HOME/sdjax`` or ``~/.cache/sdjax``).
  DNNLROOT: a oneDNN install prefix (``include/`` and ``lib/``) to use instead of the system one.
  CXX: the C++ compiler (default ``g++``).
  OMP_WAIT_POLICY: oneDNN's OpenMP threads' idle policy; `load` sets ``PASSIVE`` when it is
    unset and no OpenMP runtime is loaded yet (see `_prefer_passive_omp_wait`).
  SDJAX_ONEDNN_THREADS: OpenMP threads per oneDNN call (default: usable cores / CPU devices
    of the computation).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

__all__ = ["INSTALL_HINT", "SOURCE", "TARGETS", "build", "library_path", "load"]

SOURCE = Path(__file__).with_name("conv_ffi.cc")
"""The C++ source of the handlers."""

TARGETS = ("sdjax_onednn_conv_fwd", "sdjax_onednn_conv_bwd_data", "sdjax_onednn_conv_bwd_weights")
"""FFI target names (also the exported handler symbols)."""

INSTALL_HINT = (
    "install oneDNN and a C++ compiler (Debian/Ubuntu: `apt-get install -y libdnnl-dev g++`), "
    "then run `python -m sdjax.onednn build`"
)
"""How a user gets the oneDNN route."""

_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL] = {}


def _cache_root() -> Path:
    root = os.environ.get("SDJAX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdjax"


def _dnnl_prefixes() -> list[Path]:
    prefixes = []
    if os.environ.get("DNNLROOT"):
        prefixes.append(Path(os.environ["DNNLROOT"]))
    if os.environ.get("CONDA_PREFIX"):
        prefixes.append(Path(os.environ["CONDA_PREFIX"]))
    prefixes += [Path("/usr/local"), Path("/usr")]
    return prefixes


def _compile_command(output: Path) -> list[str]:
    """The compiler command line; raises RuntimeError naming what is missing."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"sdjax.onednn: C++ compiler {cxx!r} not found; {INSTALL_HINT}")
    prefix = next(
        (p for p in _dnnl_prefixes() if (p / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists()),
        None,
    )
    if prefix is None:
        searched = ", ".join(str(p / "include") for p in _dnnl_prefixes())
        raise RuntimeError(
            f"sdjax.onednn: oneDNN headers (oneapi/dnnl/dnnl.hpp) not found in {searched}; "
            f"{INSTALL_HINT}"
        )
    command = [cxx, "-O2", "-fPIC", "-shared", "-std=c++17", "-fopenmp", "-w"]
    command += [f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}"]
    if prefix not in (Path("/usr"), Path("/usr/local")):
        for lib in ("lib", "lib64"):
            command += [f"-L{prefix / lib}", f"-Wl,-rpath,{prefix / lib}"]
    command += [str(SOURCE), "-o", str(output), "-ldnnl"]
    return command


def library_path() -> Path:
    """Where the shared library for this source, jaxlib and compiler setup lives (built or not)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(jaxlib.__version__.encode())
    key.update(" ".join(_compile_command(Path("out.so"))).encode())
    return _cache_root() / "onednn" / key.hexdigest()[:16] / "libsdjax_onednn.so"


def build(force: bool = False) -> Path:
    """Compiles the handlers into the cache (a no-op when already built) and returns the path.

    Safe to run from several processes at once: each compiles to a temporary file and moves it
    into place atomically.

    Raises:
      RuntimeError: no compiler, no oneDNN headers, or the compilation failed (with its output).
    """
    path = library_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        result = subprocess.run(
            _compile_command(tmp_path), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                "sdjax.onednn: compiling the oneDNN handlers failed:\n"
                f"{' '.join(_compile_command(tmp_path))}\n{result.stderr[-4000:]}"
            )
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def _prefer_passive_omp_wait() -> None:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it or an OpenMP runtime is loaded.

    oneDNN's OpenMP threads otherwise spin after each call while XLA's own threads run the rest
    of the program on the same cores; on a busy host a parallel region then waits for
    descheduled spinning threads (measured on 2 shared cores: a 3x3 forward+backward at 152 ms
    median with spinning, 43 ms passive). libgomp reads the variable once, when it is loaded,
    so this has no effect if the process already runs OpenMP (e.g. after ``import torch``).
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            if any("libgomp" in line or "libiomp" in line for line in maps):
                return
    except OSError:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def load() -> ctypes.CDLL:
    """Builds if needed, loads the library and registers its FFI targets for the CPU platform.

    Idempotent and thread-safe; the first call may take several seconds (compilation).

    Raises:
      RuntimeError: the library cannot be built or loaded (the message says how to fix it).
    """
    with _LOCK:
        if "lib" in _LOADED:
            return _LOADED["lib"]
        path = build()
        _prefer_passive_omp_wait()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            raise RuntimeError(f"sdjax.onednn: cannot load {path}: {err}; {INSTALL_HINT}") from err
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        lib.sdjax_onednn_impl_info.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.sdjax_onednn_impl_info.restype = ctypes.c_int
        _LOADED["lib"] = lib
        return lib
