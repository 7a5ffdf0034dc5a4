"""sdjax.conv.conv2d: values and gradients equal lax.conv_general_dilated's, on every path."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conv_reference import assert_close as _assert_close
from conv_reference import inputs as _inputs
from conv_reference import reference as _reference
from conv_reference import values_and_grads as _values_and_grads
from jax import lax

from sdjax import conv

# (N, H, W, C_in), (KH, KW, C_in / groups, C_out), strides, padding, groups
CASES = {
    "3x3_s1_same_odd": ((2, 7, 7, 3), (3, 3, 3, 4), 1, "SAME", 1),
    "3x3_s2_same_even": ((2, 8, 8, 3), (3, 3, 3, 5), 2, "SAME", 1),
    "3x3_s2_same_odd": ((2, 7, 9, 3), (3, 3, 3, 5), 2, "SAME", 1),
    "3x3_s1_valid": ((2, 7, 6, 3), (3, 3, 3, 4), 1, "VALID", 1),
    "3x3_s2_explicit": ((2, 8, 7, 3), (3, 3, 3, 4), 2, ((1, 1), (1, 1)), 1),
    "3x3_s1_explicit_asym": ((1, 6, 7, 2), (3, 3, 2, 3), 1, ((2, 0), (0, 3)), 1),
    "3x3_s12_mixed": ((1, 7, 8, 2), (3, 3, 2, 3), (1, 2), "SAME", 1),
    "1x1_s2_even": ((2, 8, 8, 4), (1, 1, 4, 6), 2, "SAME", 1),
    "1x1_s2_odd": ((2, 7, 5, 4), (1, 1, 4, 6), 2, "VALID", 1),
    "5x5_s1_same": ((2, 7, 8, 3), (5, 5, 3, 4), 1, "SAME", 1),
    "5x5_s2_same": ((2, 9, 8, 3), (5, 5, 3, 4), 2, "SAME", 1),
    "7x7_s2_stem": ((2, 16, 16, 3), (7, 7, 3, 8), 2, "SAME", 1),
    "4x4_s3_same": ((1, 10, 11, 2), (4, 4, 2, 3), 3, "SAME", 1),
    "dw3x3_s1": ((2, 7, 8, 6), (3, 3, 1, 6), 1, "SAME", 6),
    "dw3x3_s2_odd": ((2, 9, 7, 6), (3, 3, 1, 6), 2, "SAME", 6),
    "dw5x5_s1": ((2, 7, 7, 4), (5, 5, 1, 4), 1, "SAME", 4),
    "dw5x5_s2": ((2, 10, 9, 4), (5, 5, 1, 4), 2, "SAME", 4),
    "dw3x3_valid_mult2": ((1, 7, 6, 3), (3, 3, 1, 6), 1, "VALID", 3),
    "dw3x3_explicit": ((1, 6, 6, 3), (3, 3, 1, 3), 2, ((0, 2), (1, 1)), 3),
    "grouped_fallback": ((1, 6, 6, 4), (3, 3, 2, 6), 1, "SAME", 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_grads_match_lax(name):
    x_shape, k_shape, strides, padding, groups = CASES[name]
    x, kernel = _inputs(len(name), x_shape, k_shape)
    norm_strides = (strides, strides) if isinstance(strides, int) else strides
    fast = functools.partial(
        conv.conv2d,
        strides=strides,
        padding=padding,
        feature_group_count=groups,
        impl="xla_custom_vjp",
    )
    ref = functools.partial(_reference, strides=norm_strides, padding=padding, groups=groups)
    out, (dx, dk) = _values_and_grads(fast, x, kernel, seed=len(name))
    ref_out, (ref_dx, ref_dk) = _values_and_grads(ref, x, kernel, seed=len(name))
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert dx.shape == x.shape and dk.shape == kernel.shape
    _assert_close(out, ref_out)
    _assert_close(dx, ref_dx)
    _assert_close(dk, ref_dk)


@pytest.mark.parametrize("name", ["3x3_s2_same_even", "1x1_s2_even", "dw3x3_s1"])
def test_bfloat16_matches_lax(name):
    x_shape, k_shape, strides, padding, groups = CASES[name]
    x, kernel = _inputs(3, x_shape, k_shape, jnp.bfloat16)
    kwargs = dict(strides=strides, padding=padding, feature_group_count=groups)
    out, (dx, dk) = _values_and_grads(
        functools.partial(conv.conv2d, impl="xla_custom_vjp", **kwargs), x, kernel, seed=3
    )
    ref_out, (ref_dx, ref_dk) = _values_and_grads(
        functools.partial(conv.conv2d, impl="xla", **kwargs), x, kernel, seed=3
    )
    assert out.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    for actual, expected in ((out, ref_out), (dx, ref_dx), (dk, ref_dk)):
        _assert_close(actual, expected, rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_promote():
    x, kernel = _inputs(0, (1, 5, 5, 2), (3, 3, 2, 3))
    out = conv.conv2d(x.astype(jnp.bfloat16), kernel, impl="xla_custom_vjp")
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["3x3_s1_same_odd", "3x3_s2_same_even", "dw3x3_s2_odd"])
def test_inside_cond_and_scan(name):
    x_shape, k_shape, strides, padding, groups = CASES[name]
    x, kernel = _inputs(5, x_shape, k_shape)
    kwargs = dict(strides=strides, padding=padding, feature_group_count=groups)

    def loss(impl, x, kernel):
        def branch(operands):
            return conv.conv2d(*operands, impl=impl, **kwargs)

        def skip(operands):
            return jnp.zeros_like(branch(operands))

        def body(carry, scale):
            y = lax.cond(True, branch, skip, (x * scale, kernel))
            return carry + jnp.sum(jnp.sin(y)), None

        total, _ = lax.scan(body, 0.0, jnp.array([1.0, 0.5]))
        return total

    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, "xla_custom_vjp"), (0, 1)))(
        x, kernel
    )
    ref_value, ref_grads = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1))(x, kernel)
    _assert_close(value, ref_value, rtol=1e-5, atol=1e-4)
    for actual, expected in zip(grads, ref_grads, strict=True):
        _assert_close(actual, expected)


def test_vmap_matches_lax():
    x, kernel = _inputs(7, (3, 2, 6, 6, 2), (3, 3, 2, 4))
    fast = jax.vmap(lambda a: conv.conv2d(a, kernel, strides=2, impl="xla_custom_vjp"))
    ref = jax.vmap(lambda a: conv.conv2d(a, kernel, strides=2, impl="xla"))

    @jax.jit
    def value_and_grad(x):
        return {
            impl: jax.value_and_grad(lambda a, f=f: jnp.sum(jnp.sin(f(a))))(x)
            for impl, f in (("fast", fast), ("xla", ref))
        }

    results = value_and_grad(x)
    _assert_close(results["fast"][0], results["xla"][0], rtol=1e-5, atol=1e-4)
    _assert_close(results["fast"][1], results["xla"][1])


@pytest.mark.parametrize(
    "k_shape, groups, expected",
    [((3, 3, 4, 4), 1, "custom_vjp"), ((3, 3, 1, 4), 4, "custom_vjp"), ((1, 1, 4, 4), 1, "dot")],
)
def test_auto_selects_the_custom_vjp_path_on_cpu(k_shape, groups, expected, monkeypatch):
    # Without the oneDNN route (tests/test_onednn.py covers auto -> onednn).
    monkeypatch.setenv("SDJAX_ONEDNN", "0")
    assert jax.default_backend() == "cpu"
    assert conv.resolve_impl("auto") == "xla_custom_vjp"
    x, kernel = _inputs(0, (1, 6, 6, 4), k_shape)
    fn = functools.partial(conv.conv2d, feature_group_count=groups)
    top = [str(e.primitive) for e in jax.make_jaxpr(fn)(x, kernel).jaxpr.eqns]
    assert any(expected in name for name in top), top
    assert "conv_general_dilated" not in top
    xla_top = [
        str(e.primitive)
        for e in jax.make_jaxpr(functools.partial(fn, impl="xla"))(x, kernel).jaxpr.eqns
    ]
    assert "conv_general_dilated" in xla_top


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(impl="cudnn"), "impl"),
        (dict(padding="FULL"), "padding"),
        (dict(padding=((1, 1),)), "padding"),
        (dict(padding=((-1, 1), (1, 1))), "padding"),
        (dict(strides=0), "strides"),
        (dict(strides=(1, 2, 3)), "strides"),
        (dict(feature_group_count=3), "feature_group_count"),
        (dict(feature_group_count=0), "feature_group_count"),
    ],
)
def test_invalid_arguments_raise(kwargs, field):
    x, kernel = _inputs(0, (1, 6, 6, 4), (3, 3, 4, 4))
    with pytest.raises(ValueError, match=field) as info:
        conv.conv2d(x, kernel, **kwargs)
    assert "allowed" in str(info.value)


def test_mismatched_channels_raise():
    x, kernel = _inputs(0, (1, 6, 6, 4), (3, 3, 3, 4))
    with pytest.raises(ValueError, match=r"kernel.shape\[2\]=3.*allowed"):
        conv.conv2d(x, kernel)
    with pytest.raises(ValueError, match="rank 4"):
        conv.conv2d(x[0], kernel)


def test_empty_output_raises():
    x, kernel = _inputs(0, (1, 2, 2, 4), (3, 3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        conv.conv2d(x, kernel, padding="VALID")
