"""Reference convolution helpers shared by tests/test_conv.py and tests/test_onednn.py."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax import conv

DN = ("NHWC", "HWIO", "NHWC")


def reference(x, kernel, strides, padding, groups):
    pads = conv._explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=DN, feature_group_count=groups
    )


def inputs(seed, x_shape, kernel_shape, dtype=jnp.float32):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kk, kernel_shape, jnp.float32) * 0.3).astype(dtype)
    return x, kernel


def values_and_grads(fn, x, kernel, seed):
    """Output and (dx, dkernel) for a random cotangent (fixed key), in one jitted call."""

    @jax.jit
    def run(x, kernel):
        out, vjp = jax.vjp(fn, x, kernel)
        cotangent = jax.random.normal(jax.random.key(seed + 1000), out.shape, jnp.float32)
        return out, vjp(cotangent.astype(out.dtype))

    return run(x, kernel)


def assert_close(actual, expected, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol
    )
