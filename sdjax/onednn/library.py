"""Builds and loads the oneDNN convolution handlers (``conv_ffi.cc``) as XLA FFI targets.

The shared library is compiled on first use with the host C++ compiler against oneDNN 3.x (or
2.x) and jaxlib's FFI headers (`jax.ffi.include_dir`), into a per-user cache directory keyed by
a hash of the source, the jaxlib version, the oneDNN version and library file, and the
compiler command, so it is built once per environment and again after any of them changes.
On x86-64 Linux, ``pip install sdjax`` brings oneDNN itself (the ``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp`` wheels, in ``<sys.prefix>/lib`` and ``<sys.prefix>/include``); only
the compiler comes from the system. Nothing here runs at import time.

Environment variables:
  SDJAX_CACHE_DIR: cache root (default ``$XDG_CACHE_HOME/sdjax`` or ``~/.cache/sdjax``).
  DNNLROOT: the oneDNN install prefix (``include/`` and ``lib/``) to use; when set, no other
    prefix is searched (see `_dnnl_prefixes` for the default search).
  CXX: the C++ compiler command (default ``g++``); it may carry a launcher, e.g. ``ccache g++``.
  OMP_WAIT_POLICY: oneDNN's OpenMP threads' idle policy; `load` sets ``PASSIVE`` when it is
    unset and no OpenMP runtime is loaded yet (see `_prefer_passive_omp_wait`).
  SDJAX_ONEDNN_THREADS: OpenMP threads per oneDNN call (default: usable cores / CPU devices
    of the computation).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib

__all__ = ["INSTALL_HINT", "SOURCE", "TARGETS", "build", "library_path", "load", "stats"]

SOURCE = Path(__file__).with_name("conv_ffi.cc")
"""The C++ source of the handlers."""

TARGETS = ("sdjax_onednn_conv_fwd", "sdjax_onednn_conv_bwd_data", "sdjax_onednn_conv_bwd_weights")
"""FFI target names (also the exported handler symbols)."""

INSTALL_HINT = (
    "the oneDNN route needs the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels (installed "
    "with sdjax on x86-64 Linux) and a C++ compiler (e.g. `apt-get install -y g++`); "
    "check with `python -m sdjax.onednn build`"
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
    """Install prefixes searched for oneDNN, in order.

    ``$DNNLROOT`` alone when set; else this Python's prefix (where pip puts the wheels), the
    user base (``pip install --user``), ``$CONDA_PREFIX``, ``/usr/local`` and ``/usr``.
    """
    if os.environ.get("DNNLROOT"):
        return [Path(os.environ["DNNLROOT"])]
    prefixes = [Path(sys.prefix), Path(site.getuserbase())]
    if os.environ.get("CONDA_PREFIX"):
        prefixes.append(Path(os.environ["CONDA_PREFIX"]))
    prefixes += [Path("/usr/local"), Path("/usr")]
    return list(dict.fromkeys(prefixes))


@dataclass(frozen=True)
class _Dnnl:
    prefix: Path
    library: Path | None  # libdnnl.so, resolved; None when the linker's default path has it
    version: str  # "major.minor.patch hash", from dnnl_version.h


def _find_dnnl() -> _Dnnl:
    """The first prefix with oneDNN's headers; raises RuntimeError naming the places searched."""
    for prefix in _dnnl_prefixes():
        header_dir = prefix / "include" / "oneapi" / "dnnl"
        if not (header_dir / "dnnl.hpp").exists():
            continue
        version = "unknown"
        version_file = header_dir / "dnnl_version.h"
        if version_file.exists():
            text = version_file.read_text(errors="replace")
            fields = dict(re.findall(r"#define DNNL_VERSION_(\w+)\s+(\S+)", text))
            version = "{}.{}.{} {}".format(
                *(fields.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH", "HASH"))
            )
        candidates = [prefix / "lib" / "libdnnl.so", prefix / "lib64" / "libdnnl.so"]
        candidates += sorted((prefix / "lib").glob("*-linux-gnu/libdnnl.so"))
        library = next((p.resolve() for p in candidates if p.exists()), None)
        return _Dnnl(prefix, library, version)
    searched = ", ".join(str(p / "include") for p in _dnnl_prefixes())
    raise RuntimeError(
        f"sdjax.onednn: oneDNN headers (oneapi/dnnl/dnnl.hpp) not found in {searched}; "
        f"{INSTALL_HINT}"
    )


def _compiler() -> list[str]:
    """``$CXX`` (default ``g++``) split as a shell would, e.g. ``["ccache", "g++"]``."""
    return shlex.split(os.environ.get("CXX") or "g++")


def _compile_command(output: Path, dnnl: _Dnnl) -> list[str]:
    """The compiler command line (not checked: `build` checks that the compiler exists)."""
    command = [*_compiler(), "-O2", "-fPIC", "-shared", "-std=c++17", "-fopenmp", "-w"]
    command += [f"-I{jax.ffi.include_dir()}", f"-I{dnnl.prefix / 'include'}"]
    if dnnl.prefix not in (Path("/usr"), Path("/usr/local")):
        lib_dir = dnnl.library.parent if dnnl.library is not None else dnnl.prefix / "lib"
        command += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    # -z defs: an unresolved symbol fails the link here instead of the load later.
    command += [str(SOURCE), "-o", str(output), "-Wl,-z,defs", "-ldnnl"]
    return command


def library_path() -> Path:
    """Where the shared library for this source, jaxlib, oneDNN and compiler lives (built or not).

    Needs oneDNN's headers (for its version) but no compiler.

    Raises:
      RuntimeError: oneDNN's headers are not found.
    """
    dnnl = _find_dnnl()
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(jaxlib.__version__.encode())
    key.update(dnnl.version.encode())
    if dnnl.library is not None:
        key.update(f"{dnnl.library} {dnnl.library.stat().st_size}".encode())
    key.update(" ".join(_compile_command(Path("out.so"), dnnl)).encode())
    return _cache_root() / "onednn" / key.hexdigest()[:16] / "libsdjax_onednn.so"


def build(force: bool = False) -> Path:
    """Compiles the handlers into the cache (a no-op when already built) and returns the path.

    Safe to run from several processes at once: each compiles to a temporary file and moves it
    into place atomically.

    Raises:
      RuntimeError: no compiler, no oneDNN headers, or the compilation failed (the first line
        says which; the compiler's output follows).
    """
    path = library_path()
    if path.exists() and not force:
        return path
    compiler = _compiler()
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(
            f"sdjax.onednn: C++ compiler {os.environ.get('CXX') or 'g++'!r} not found; "
            f"{INSTALL_HINT}"
        )
    dnnl = _find_dnnl()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        command = _compile_command(tmp_path, dnnl)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"sdjax.onednn: compiling the oneDNN handlers failed ({compiler[0]} exit code "
                f"{result.returncode}); {INSTALL_HINT}\n{shlex.join(command)}\n"
                f"{result.stderr[-4000:]}"
            )
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def _prefer_passive_omp_wait() -> None:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it or an OpenMP runtime is loaded.

    oneDNN's OpenMP threads otherwise spin after each call while XLA's own threads run the rest
    of the program on the same cores; on a busy host a parallel region then waits for
    descheduled spinning threads (the measurement: docs/performance.md, "oneDNN's OpenMP
    threads"). libgomp reads the variable once, when it is loaded,
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


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in TARGETS:
        getattr(lib, name)  # a library without the handlers is stale: AttributeError
    lib.sdjax_onednn_impl_info.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.sdjax_onednn_impl_info.restype = ctypes.c_int
    lib.sdjax_onednn_stats.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.sdjax_onednn_stats.restype = ctypes.c_int64
    lib.sdjax_onednn_set_cache_capacity.argtypes = [ctypes.c_int64]
    lib.sdjax_onednn_set_cache_capacity.restype = None
    lib.sdjax_onednn_version.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.sdjax_onednn_version.restype = ctypes.c_int64
    return lib


def load() -> ctypes.CDLL:
    """Builds if needed, loads the library and registers its FFI targets for the CPU platform.

    A cached library that fails to load (e.g. built against a oneDNN since removed) is rebuilt
    once. Idempotent and thread-safe; the first call may take several seconds (compilation).

    Raises:
      RuntimeError: the library cannot be built or loaded (the message says how to fix it).
    """
    with _LOCK:
        if "lib" in _LOADED:
            return _LOADED["lib"]
        path = build()
        _prefer_passive_omp_wait()
        try:
            lib = _open(path)
        except (OSError, AttributeError):
            path = build(force=True)
            try:
                lib = _open(path)
            except (OSError, AttributeError) as err:
                raise RuntimeError(
                    f"sdjax.onednn: cannot load {path}: {err}; {INSTALL_HINT}"
                ) from err
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        _LOADED["lib"] = lib
        return lib


def stats() -> dict[str, object]:
    """The loaded handlers' state: primitive cache size and capacity, the thread budget, the
    threads in use and their peak, the OpenMP thread count each cached primitive was built with
    (most recently used first), and the oneDNN versions (run, compiled against).

    Raises:
      RuntimeError: the handlers cannot be built or loaded.
    """
    lib = load()
    count = lib.sdjax_onednn_stats(None, 0)
    values = (ctypes.c_int64 * count)()
    lib.sdjax_onednn_stats(values, count)
    compiled = ctypes.c_int64()
    running = lib.sdjax_onednn_version(ctypes.byref(compiled))
    return {
        "cache_size": values[0],
        "cache_capacity": values[1],
        "thread_budget": values[2],
        "threads_in_use": values[3],
        "peak_threads_in_use": values[4],
        "built_threads": list(values[5:]),
        "version": running,
        "compiled_version": compiled.value,
    }


def set_cache_capacity(capacity: int) -> None:
    """Sets the primitive cache's capacity (least recently used entries beyond it are dropped).

    Raises:
      ValueError: ``capacity`` is not a positive int.
      RuntimeError: the handlers cannot be built or loaded.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"set_cache_capacity: capacity={capacity!r}; allowed: a positive int")
    load().sdjax_onednn_set_cache_capacity(capacity)
