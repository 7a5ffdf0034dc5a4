"""Property-based tests (hypothesis) of ops.dropout and ops.drop_path over random shapes,
ranks, dtypes, rates and keys: mask structure, finiteness, scaling and (loosely) the mean."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sdjax import ops

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)
rates = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0, allow_nan=False))


def _input(shape, dtype, seed):
    # Values in [1, 2): never zero, so a zero in the output means "dropped".
    return jnp.asarray(np.random.default_rng(seed).uniform(1.0, 2.0, shape), dtype)


# One compiled program per (shape, dtype, static arguments) instead of op-by-op dispatch.
_drop_path = jax.jit(ops.drop_path, static_argnames=("rate", "mode", "scale_by_keep"))
_dropout = jax.jit(ops.dropout, static_argnames=("rate", "broadcast_dims"))


def _scale(rate, dtype):
    return np.asarray(jnp.asarray(1.0 / (1.0 - rate), dtype).astype(jnp.float32))


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    rate=rates,
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(ops.DROP_PATH_MODES),
    scale_by_keep=st.booleans(),
)
def test_drop_path_structure(shape, dtype, rate, seed, mode, scale_by_keep):
    x = _input(shape, dtype, seed)
    out = _drop_path(x, rate=rate, key=jax.random.key(seed), mode=mode, scale_by_keep=scale_by_keep)
    assert out.shape == x.shape and out.dtype == x.dtype
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out32).all()
    kept = out32 != 0
    per_sample = kept.reshape(shape[0], -1)
    # Whole samples (row) or the whole input (batch) are kept or dropped together.
    assert (per_sample.all(axis=1) | ~per_sample.any(axis=1)).all()
    if mode == "batch":
        assert kept.all() or not kept.any()
    if rate == 0.0:
        assert kept.all()
    if rate == 1.0:
        assert not kept.any()
    if 0.0 < rate < 1.0:
        factor = _scale(rate, dtype) if scale_by_keep else 1.0
        expected = np.asarray(x, np.float32) * np.float32(factor)
        expected = np.asarray(jnp.asarray(expected, dtype), np.float32)  # rounded like out
        np.testing.assert_array_equal(out32[kept], expected[kept])


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    rate=rates,
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_dropout_structure(shape, dtype, rate, seed, data):
    ndim = len(shape)
    dims = tuple(data.draw(st.sets(st.integers(0, ndim - 1), max_size=ndim)))
    x = _input(shape, dtype, seed)
    out = _dropout(x, rate=rate, key=jax.random.key(seed), broadcast_dims=dims)
    assert out.shape == x.shape and out.dtype == x.dtype
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out32).all()
    kept = out32 != 0
    for axis in dims:  # the mask is constant along broadcast axes
        assert (kept == kept.take([0], axis=axis)).all()
    if rate == 0.0:
        assert kept.all()
    if rate == 1.0:
        assert not kept.any()


@SETTINGS
@given(
    rate=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**31 - 1),
    op=st.sampled_from(["dropout", "row"]),
)
def test_mean_preserved_loosely(rate, seed, op):
    n = 20_000
    x = jnp.ones((n, 1))
    key = jax.random.key(seed)
    out = ops.dropout(x, rate, key=key) if op == "dropout" else ops.drop_path(x, rate, key=key)
    sigma = np.sqrt(rate / (1.0 - rate) / n)
    assert abs(float(out.mean()) - 1.0) < 6 * sigma
