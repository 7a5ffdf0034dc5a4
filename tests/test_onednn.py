"""The oneDNN route of sdjax.conv.conv2d: values and gradients equal lax.conv_general_dilated's.

Needs oneDNN (the onednn-cpu-gomp / onednn-devel-cpu-gomp wheels sdjax installs on x86-64 Linux)
and a C++ compiler. Without them every test here fails under CI (``CI`` set to a true value) and
is skipped elsewhere, with the reason naming what is missing (the `_onednn_route` fixture).
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from conv_reference import assert_close as _assert_close
from conv_reference import inputs as _inputs
from conv_reference import reference as _reference
from conv_reference import values_and_grads as _values_and_grads
from jax import lax

from sdjax import conv, onednn


def _require_onednn():
    reason = onednn.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must test the oneDNN route: {reason}")
    pytest.skip(f"oneDNN route unavailable: {reason.splitlines()[0]}")


@pytest.fixture(autouse=True)
def _onednn_route():
    _require_onednn()


def _ffi_targets(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return sorted({t for t in onednn.library.TARGETS if t in text})


# (N, H, W, C_in), (KH, KW, C_in / groups, C_out), strides, padding, groups
CASES = {
    "3x3_s1_same": ((2, 7, 7, 3), (3, 3, 3, 4), 1, "SAME", 1),
    "3x3_s2_same_even": ((2, 8, 8, 3), (3, 3, 3, 5), 2, "SAME", 1),
    "3x3_s2_same_odd": ((2, 7, 9, 3), (3, 3, 3, 5), 2, "SAME", 1),
    "3x3_s1_valid": ((2, 7, 6, 3), (3, 3, 3, 4), 1, "VALID", 1),
    "3x3_s2_explicit_asym": ((1, 8, 7, 2), (3, 3, 2, 3), 2, ((2, 0), (0, 3)), 1),
    "3x3_s12_mixed": ((1, 7, 8, 2), (3, 3, 2, 3), (1, 2), "SAME", 1),
    "1x1_s1": ((2, 5, 6, 4), (1, 1, 4, 6), 1, "SAME", 1),
    "1x1_s2": ((2, 7, 5, 4), (1, 1, 4, 6), 2, "VALID", 1),
    "5x5_s2_same": ((2, 9, 8, 3), (5, 5, 3, 4), 2, "SAME", 1),
    "depthwise_3x3_s1": ((2, 7, 7, 4), (3, 3, 1, 4), 1, "SAME", 4),
    "depthwise_5x5_s2": ((2, 9, 8, 4), (5, 5, 1, 4), 2, "SAME", 4),
    "depthwise_3x3_mult2": ((2, 6, 6, 3), (3, 3, 1, 6), 2, "SAME", 3),
    "grouped_3x3": ((2, 6, 6, 4), (3, 3, 2, 6), 1, "SAME", 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_grads_match_lax(name):
    x_shape, k_shape, strides, padding, groups = CASES[name]
    x, kernel = _inputs(0, x_shape, k_shape)
    fn = functools.partial(
        conv.conv2d, strides=strides, padding=padding, feature_group_count=groups, impl="onednn"
    )
    assert _ffi_targets(fn, x, kernel) == ["sdjax_onednn_conv_fwd"]
    out, (dx, dk) = _values_and_grads(fn, x, kernel, 0)
    ref = functools.partial(_reference, strides=conv._normalize_strides(strides), padding=padding)
    ref_out, (ref_dx, ref_dk) = _values_and_grads(
        lambda a, b: ref(a, b, groups=groups), x, kernel, 0
    )
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    _assert_close(out, ref_out)
    _assert_close(dx, ref_dx)
    _assert_close(dk, ref_dk, rtol=1e-4, atol=1e-4)


def test_bfloat16_matches_lax_within_rounding_or_is_refused_where_onednn_has_none():
    """oneDNN 2.x has bfloat16 convolutions only on AVX-512 CPUs: elsewhere the explicit route
    is a clear error before compiling (``"auto"`` falls back, see below)."""
    x, kernel = _inputs(1, (2, 8, 8, 8), (3, 3, 8, 8), jnp.bfloat16)
    fn = functools.partial(conv.conv2d, strides=2, impl="onednn")
    case = (x.shape, kernel.shape, (2, 2), ((0, 1), (0, 1)), 1, "bfloat16")
    if onednn.missing_implementation(*case) is not None:
        with pytest.raises(ValueError, match="impl='onednn' cannot run dtype=bfloat16 on this CPU"):
            jax.jit(fn).lower(x, kernel)
        assert not onednn.has_fast_kernels(*case)
        return
    out, (dx, dk) = _values_and_grads(fn, x, kernel, 1)
    ref_out, (ref_dx, ref_dk) = _values_and_grads(
        lambda a, b: _reference(a, b, (2, 2), "SAME", 1), x, kernel, 1
    )
    assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    for got, want in ((out, ref_out), (dx, ref_dx), (dk, ref_dk)):
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        _assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)


def test_auto_uses_onednn_on_cpu_and_env_turns_it_off(monkeypatch):
    x, kernel = _inputs(0, (1, 6, 6, 4), (3, 3, 4, 4))
    assert conv.resolve_impl("auto") == "onednn"
    assert _ffi_targets(conv.conv2d, x, kernel) == ["sdjax_onednn_conv_fwd"]
    monkeypatch.setenv("SDJAX_ONEDNN", "0")
    assert conv.resolve_impl("auto") == "xla_custom_vjp"
    # A new function: jit's cache of the one above does not see the environment.
    assert _ffi_targets(lambda a, b: conv.conv2d(a, b), x, kernel) == []


def test_float16_falls_back_with_auto_and_raises_with_onednn():
    x, kernel = _inputs(0, (1, 6, 6, 4), (3, 3, 4, 4), jnp.float16)
    assert _ffi_targets(conv.conv2d, x, kernel) == []
    with pytest.raises(ValueError, match="dtype=float16.*allowed dtypes"):
        conv.conv2d(x, kernel, impl="onednn")


def test_export_for_gpu_and_tpu_has_no_custom_call():
    x, kernel = _inputs(0, (2, 8, 8, 4), (3, 3, 4, 6))

    def loss(x, kernel):
        return jnp.sum(conv.conv2d(x, kernel, strides=2, impl="auto") ** 2)

    for fn in (functools.partial(conv.conv2d, strides=2), jax.grad(loss, argnums=(0, 1))):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu", "cuda"])(x, kernel)
        text = exported.mlir_module()
        assert "stablehlo.custom_call" not in text
        assert "stablehlo.convolution" in text


def _loss(x, kernel, impl, wrap):
    def layer(h):
        return jnp.tanh(conv.conv2d(h, kernel, impl=impl))

    return jnp.sum(wrap(layer, x) ** 2)


WRAPPERS = {
    "cond": lambda layer, x: lax.cond(jnp.sum(x) > -1e9, layer, lambda h: -h, x),
    "scan": lambda layer, x: lax.scan(lambda h, _: (layer(h), None), x, None, length=2)[0],
    "remat": lambda layer, x: jax.checkpoint(layer)(x),
    "vmap": lambda layer, x: jax.vmap(layer)(x[:, None])[:, 0],
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_inside_control_flow_remat_and_vmap(wrapper):
    x, kernel = _inputs(2, (2, 6, 6, 4), (3, 3, 4, 4))
    wrap = WRAPPERS[wrapper]
    fn = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=(2, 3))
    got_loss, (got_dx, got_dk) = fn(x, kernel, "onednn", wrap)
    want_loss, (want_dx, want_dk) = fn(x, kernel, "xla", wrap)
    _assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-4)
    _assert_close(got_dx, want_dx, rtol=1e-4, atol=1e-4)
    _assert_close(got_dk, want_dk, rtol=1e-4, atol=1e-4)


def test_vmap_over_kernels_matches_lax():
    xs, kernels = _inputs(3, (3, 2, 6, 6, 4), (3, 3, 3, 4, 5))

    def loss(x, kernel, impl):
        return jnp.sum(jnp.sin(conv.conv2d(x, kernel, strides=2, impl=impl)))

    grads = {
        impl: jax.jit(jax.vmap(jax.grad(functools.partial(loss, impl=impl), (0, 1))))(xs, kernels)
        for impl in ("onednn", "xla")
    }
    for got, want in zip(grads["onednn"], grads["xla"], strict=True):
        _assert_close(got, want, rtol=1e-4, atol=1e-4)


_SHARDED_CHILD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sdjax import conv

    assert len(jax.devices()) == 2
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    k1 = jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) * 0.3
    k2 = jax.random.normal(jax.random.key(2), (1, 1, 6, 6)) * 0.3

    def loss(params, x, impl):
        h = jnp.tanh(conv.conv2d(x, params[0], strides=2, impl=impl))
        return jnp.mean(jnp.sin(conv.conv2d(h, params[1], impl=impl)))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    params = jax.device_put((k1, k2), NamedSharding(mesh, P()))
    hlo = step.lower(params, xs, "onednn").compile().as_text()
    assert "all-gather" not in hlo, "activations gathered"
    assert hlo.count("sdjax_onednn_conv_") >= 4, hlo
    (got, got_g), (want, want_g) = step(params, xs, "onednn"), step(params, xs, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("SHARDED_OK")
    """
)


def test_two_cpu_devices_call_onednn_per_shard_without_gather():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-4000:]


def test_eager_calls_outside_jit_match_lax():
    """``model.init`` / ``apply`` outside ``jax.jit`` (as the README's example runs) work."""
    x, kernel = _inputs(0, (2, 9, 9, 3), (3, 3, 3, 4))
    got = onednn.conv2d(x, kernel, (2, 2), ((1, 1), (1, 1)), 1)  # no jit around it
    want = lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    _assert_close(got, want)
    grad = jax.grad(lambda k: onednn.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), 1).sum())(kernel)
    want_grad = jax.grad(
        lambda k: lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        ).sum()
    )(kernel)
    _assert_close(grad, want_grad)
