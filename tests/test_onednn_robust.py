"""The oneDNN route's handler and build under the conditions a review found them weak in.

Threads (per call, in the cache key, a budget for overlapping calls), `jax.export`, second-order
gradients, stale and compiler-less caches, bad sizes, the LRU cache, bf16 kernel gradients under
sharding and failed builds. Needs oneDNN like tests/test_onednn.py (skipped without it, failed
under CI); the build checks that need no oneDNN run everywhere.
"""

import ctypes
import functools
import json
import os
import site
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_reference import assert_close as _assert_close
from conv_reference import inputs as _inputs
from test_onednn import _require_onednn

from sdjax import conv, onednn
from sdjax.onednn import conv as onednn_conv
from sdjax.onednn import library

needs_onednn = pytest.mark.usefixtures("onednn_route")


@pytest.fixture
def onednn_route():
    _require_onednn()


def _child(code, *args, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Threads.

_THREADS_CHILD = """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sdjax import conv, onednn

    dtype = jnp.dtype(sys.argv[1])
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4)).astype(dtype)
    k = (jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) * 0.3).astype(dtype)

    def loss(k, x, impl):
        y = conv.conv2d(x, k, strides=2, impl=impl).astype(jnp.float32)
        return jnp.mean(jnp.sin(y))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ks = jax.device_put(k, NamedSharding(mesh, P()))
    hlo = step.lower(ks, xs, "auto").compile().as_text()
    got = step(ks, xs, "auto")[1]
    want = jax.jit(jax.grad(loss), static_argnums=2)(k.astype(jnp.float32), x.astype(jnp.float32), "xla")
    reduces = [line for line in hlo.splitlines() if "all-reduce(" in line]
    print(json.dumps({
        "stats": onednn.library.stats(), "onednn": "sdjax_onednn" in hlo,
        "reduces": reduces, "err": float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))),
        "scale": float(jnp.max(jnp.abs(want))),
    }))
"""


def _threads_child(dtype, **env):
    return json.loads(_child(_THREADS_CHILD, dtype, **env).splitlines()[-1])


@needs_onednn
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_threads_env_var_reaches_every_primitive_including_trace_time_builds():
    """impl="auto" builds the three passes at trace time (`has_fast_kernels`); before, they
    were cached with OpenMP's default thread count and the calls reused them."""
    out = _threads_child("float32", SDJAX_ONEDNN_THREADS="1", JAX_NUM_CPU_DEVICES="1")
    assert out["onednn"]
    assert out["stats"]["built_threads"] and set(out["stats"]["built_threads"]) == {1}, out


@needs_onednn
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_two_cpu_devices_share_the_cores_and_the_bf16_kernel_gradient_sums_in_float32():
    case = ((4, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1)), 1, "bfloat16")
    if not onednn.has_fast_kernels(*case):
        pytest.skip("no optimized bfloat16 convolutions in oneDNN on this CPU")
    out = _threads_child("bfloat16", JAX_NUM_CPU_DEVICES="2", SDJAX_ONEDNN_THREADS="")
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert out["onednn"]
    assert set(out["stats"]["built_threads"]) == {share}, out
    # The kernel gradient's all-reduce runs on float32 (before: bf16 shards rounded, then summed).
    kernel_reduces = [line for line in out["reduces"] if "[3,3,4,6]" in line]
    assert kernel_reduces and all("f32[3,3,4,6]" in line for line in kernel_reduces), out
    assert out["err"] <= 2e-2 * out["scale"], out


@needs_onednn
def test_overlapping_calls_stay_within_the_thread_budget_and_agree_with_xla():
    """Calls from several threads at once (as XLA's overlapping dx and dW calls, or several CPU
    devices) hold at most the usable cores' worth of OpenMP threads, and use no shared
    scratchpad (reorders included): each result equals XLA's."""
    x, kernel = _inputs(5, (4, 12, 12, 8), (3, 3, 8, 16))

    def loss(x, kernel, impl):
        return jnp.sum(jnp.tanh(conv.conv2d(x, kernel, impl=impl)) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    want = grad(x, kernel, "xla")
    results = []

    def work():
        for _ in range(3):
            results.append(jax.block_until_ready(grad(x, kernel, "onednn")))

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 9
    for got in results:
        for a, b in zip(got, want, strict=True):
            _assert_close(a, b, rtol=1e-4, atol=1e-4)
    stats = library.stats()
    per_call = onednn_conv._num_threads(len(jax.local_devices(backend="cpu")))
    assert stats["peak_threads_in_use"] <= max(stats["thread_budget"], per_call), stats
    assert stats["threads_in_use"] == 0


# ---------------------------------------------------------------------------------------------
# jax.export and second-order gradients.


@needs_onednn
@pytest.mark.parametrize("platforms", [("cpu",), ("cpu", "cuda")])
def test_export_for_cpu_lowers_to_the_xla_convolution(platforms):
    x, kernel = _inputs(6, (2, 8, 8, 4), (3, 3, 4, 6))

    def loss(x, kernel):
        return jnp.sum(jnp.sin(conv.conv2d(x, kernel, strides=2)))

    for fn in (functools.partial(conv.conv2d, strides=2), jax.grad(loss, argnums=(0, 1))):
        assert "sdjax_onednn" in jax.jit(fn).lower(x, kernel).as_text()  # the live route
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(x, kernel)
        text = exported.mlir_module()
        assert "custom_call" not in text
        assert "stablehlo.convolution" in text
        got = exported.call(x, kernel)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(fn)(x, kernel)), strict=True):
            _assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_grad_of_grad_matches_xla():
    """Reverse over reverse: each pass's VJP is two other passes, so it stays on oneDNN."""
    x, kernel = _inputs(7, (2, 7, 7, 3), (3, 3, 3, 4))

    def penalty(x, kernel, impl):
        def loss(x, kernel):
            return jnp.sum(jnp.tanh(conv.conv2d(x, kernel, strides=2, impl=impl)) ** 2)

        dx, dk = jax.grad(loss, argnums=(0, 1))(x, kernel)
        return jnp.sum(dx**2) + jnp.sum(jnp.sin(dk))

    second = jax.jit(jax.grad(penalty, argnums=(0, 1)), static_argnums=2)
    text = second.lower(x, kernel, "onednn").as_text()
    assert "stablehlo.convolution" not in text and "sdjax_onednn_conv_bwd_data" in text
    for got, want in zip(second(x, kernel, "onednn"), second(x, kernel, "xla"), strict=True):
        _assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad sizes, the LRU cache.


@needs_onednn
def test_zero_feature_groups_is_a_value_error_in_python_and_an_error_code_in_c():
    """Before: feature_group_count=0 reached C and divided by zero (SIGFPE)."""
    case = ((1, 6, 6, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="feature_group_count=0"):
        onednn.impl_info("fwd", *case, feature_group_count=0)
    with pytest.raises(ValueError, match="feature_group_count=0"):
        onednn.has_fast_kernels(*case, 0)
    geom = [1, 4, 6, 6, 4, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 0]
    buf = ctypes.create_string_buffer(256)
    arr = (ctypes.c_int64 * len(geom))(*geom)
    assert library.load().sdjax_onednn_impl_info(0, 0, arr, 1, buf, len(buf)) == -1
    assert "groups" in buf.value.decode()


def _ffi(kind, a, b, out_shape, out_dtype=None):
    attrs = onednn_conv._attrs((1, 1), ((1, 1), (1, 1)), 1, 1)
    call = jax.ffi.ffi_call(
        library.TARGETS[kind], jax.ShapeDtypeStruct(out_shape, out_dtype or a.dtype)
    )
    return jax.jit(lambda a, b: call(a, b, **attrs))(a, b)


@needs_onednn
def test_output_height_and_width_are_checked_in_c():
    """Before: an output of the wrong height/width hit a primitive cached for another one."""
    x, kernel = _inputs(8, (1, 6, 6, 4), (3, 3, 4, 4))
    assert _ffi(0, x, kernel, (1, 6, 6, 4)).shape == (1, 6, 6, 4)
    with pytest.raises(Exception, match="output height/width do not match"):
        jax.block_until_ready(_ffi(0, x, kernel, (1, 5, 6, 4)))


@needs_onednn
def test_batch_zero_gives_empty_outputs_and_a_zero_kernel_gradient():
    x, kernel = _inputs(9, (0, 6, 6, 4), (3, 3, 4, 4))
    # In C: the handler zero-fills the kernel gradient of an empty batch.
    dw = _ffi(2, x, jnp.zeros((0, 6, 6, 4)), (3, 3, 4, 4), jnp.float32)
    np.testing.assert_array_equal(np.asarray(dw), 0.0)
    # In Python: conv2d makes no call for empty operands.
    out, vjp = jax.vjp(functools.partial(conv.conv2d, impl="onednn"), x, kernel)
    dx, dk = vjp(jnp.ones_like(out))
    assert out.shape == (0, 6, 6, 4) and dx.shape == x.shape
    np.testing.assert_array_equal(np.asarray(dk), 0.0)


@needs_onednn
def test_primitive_cache_is_a_bounded_lru():
    try:
        library.set_cache_capacity(2)
        for size in (5, 6, 7):
            onednn.impl_info("fwd", (1, size, size, 4), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1)))
        assert library.stats()["cache_size"] == 2
        assert library.stats()["cache_capacity"] == 2
    finally:
        library.set_cache_capacity(512)
    with pytest.raises(ValueError, match="capacity=0"):
        library.set_cache_capacity(0)


# ---------------------------------------------------------------------------------------------
# The build: cache key, compiler lookup, prefixes, failed loads.


def _fake_prefix(root: Path, minor: int) -> Path:
    """A oneDNN prefix with (empty) headers claiming version 3.<minor>."""
    headers = root / "include" / "oneapi" / "dnnl"
    headers.mkdir(parents=True, exist_ok=True)
    (headers / "dnnl.hpp").write_text("")
    (headers / "dnnl_version.h").write_text(
        f"#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR {minor}\n"
        '#define DNNL_VERSION_PATCH 0\n#define DNNL_VERSION_HASH "x"\n'
    )
    return root


def test_library_path_changes_with_the_onednn_version(monkeypatch, tmp_path):
    """An upgrade in place (same prefix) gets a new cache entry (before: the stale one)."""
    monkeypatch.setenv("DNNLROOT", str(_fake_prefix(tmp_path, 2)))
    before = library.library_path()
    _fake_prefix(tmp_path, 3)
    assert library.library_path() != before


def test_library_path_needs_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("DNNLROOT", str(_fake_prefix(tmp_path / "a", 2)))
    path = library.library_path()
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ on it
    assert library.library_path() == path


def test_cxx_may_carry_a_launcher(monkeypatch, tmp_path):
    """``CXX="ccache g++"`` is split as a shell would (before: looked up as one file name)."""
    monkeypatch.setenv("DNNLROOT", str(_fake_prefix(tmp_path / "a", 2)))
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "env g++")
    commands = []

    def fake_run(command, **kwargs):
        del kwargs
        commands.append(command)
        Path(command[command.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(library.subprocess, "run", fake_run)
    path = library.build()
    assert path.exists() and commands[0][:2] == ["env", "g++"]
    assert "-Wl,-z,defs" in commands[0]


def test_prefixes_include_this_python_and_the_user_base(monkeypatch, tmp_path):
    monkeypatch.delenv("DNNLROOT", raising=False)
    prefixes = library._dnnl_prefixes()
    assert prefixes[0] == Path(sys.prefix)
    assert Path(site.getuserbase()) in prefixes
    monkeypatch.setenv("DNNLROOT", str(tmp_path))
    assert library._dnnl_prefixes() == [tmp_path]


_LOAD_CHILD = """
    from sdjax import onednn
    import sys
    path = onednn.library_path()
    if sys.argv[1] == "corrupt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a shared library")
    assert onednn.available(), onednn.unavailable_reason()
    print("LOADED", path)
"""


@needs_onednn
def test_a_cached_library_loads_without_a_compiler(tmp_path):
    library.load()  # the cache holds this environment's library
    out = _child(_LOAD_CHILD, "cached", PATH=str(tmp_path))
    assert "LOADED" in out


@needs_onednn
def test_a_cached_library_that_fails_to_load_is_rebuilt_once(tmp_path):
    out = _child(_LOAD_CHILD, "corrupt", SDJAX_CACHE_DIR=str(tmp_path))
    assert "LOADED" in out
