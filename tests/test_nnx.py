"""Tests of the NNX layers: same semantics as the ops, NNX rng plumbing and train/eval modes."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sdjax import ops
from sdjax.nnx import Dropout, StochasticDepth


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, scale_by_keep: bool = True):
        self.linear = nnx.Linear(3, 3, rngs=rngs)
        self.drop_path = StochasticDepth(0.5, scale_by_keep=scale_by_keep, rngs=rngs)
        self.dropout = Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        h = self.linear(x)
        return h + self.dropout(self.drop_path(h))


def test_explicit_key_matches_ops():
    x = jnp.ones((64, 4))
    key = jax.random.key(1)
    chex.assert_trees_all_equal(
        StochasticDepth(0.5, mode="batch")(x, rngs=key),
        ops.drop_path(x, 0.5, key=key, mode="batch"),
    )
    chex.assert_trees_all_equal(
        Dropout(0.5, broadcast_dims=(1,))(x, rngs=key),
        ops.dropout(x, 0.5, key=key, broadcast_dims=(1,)),
    )


def test_stream_advances_and_is_reproducible():
    x = jnp.ones((64, 4))
    layer = StochasticDepth(0.5, rngs=nnx.Rngs(dropout=3))
    a, b = layer(x), layer(x)
    assert not bool(jnp.array_equal(a, b))  # a new key per call
    again = StochasticDepth(0.5, rngs=nnx.Rngs(dropout=3))
    chex.assert_trees_all_equal(again(x), a)  # same seed, same masks
    kept = jnp.any(a != 0, axis=1)
    chex.assert_trees_all_equal(a, jnp.where(kept[:, None], 2.0 * x, 0.0))


@pytest.mark.parametrize("scale_by_keep, eval_factor", [(False, 0.5), (True, 1.0)])
def test_train_eval_and_jit(scale_by_keep, eval_factor):
    """Eval: dropout is the identity; stochastic depth (rate 0.5) passes its input whole with
    ``scale_by_keep=True`` (training scaled the kept ones) and times 0.5 without."""
    model = Model(nnx.Rngs(0, dropout=1), scale_by_keep=scale_by_keep)
    x = jnp.ones((8, 3))
    model.eval()
    assert model.drop_path.deterministic and model.dropout.deterministic
    h = model.linear(x)
    chex.assert_trees_all_close(model(x), h + eval_factor * h)
    model.train()

    @nnx.jit
    def step(model, x):
        return model(x)

    a, b = step(model, x), step(model, x)
    assert not bool(jnp.array_equal(a, b))
    chex.assert_trees_all_close(nnx.view(model, deterministic=True)(x), h + eval_factor * h)


def test_missing_key_and_invalid_arguments():
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(dropout=seed\)"):
        StochasticDepth(0.5)(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(dropout=seed\)"):
        Dropout(0.5)(jnp.ones((4, 3)))
    for rate in (-0.1, 1.1, float("nan"), True):
        with pytest.raises(ValueError, match="rate"):
            StochasticDepth(rate)
        with pytest.raises(ValueError, match="rate"):
            Dropout(rate)
    with pytest.raises(ValueError, match="mode"):
        StochasticDepth(0.5, mode="sample")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_edges_and_dtypes(dtype):
    x = jnp.ones((8, 3), dtype)
    key = jax.random.key(0)
    assert StochasticDepth(0.0)(x, rngs=key) is x
    out = StochasticDepth(1.0)(x)  # rate 1 needs no key
    chex.assert_trees_all_equal(out, jnp.zeros_like(x))
    grad = jax.grad(lambda x: StochasticDepth(1.0)(x).astype(jnp.float32).sum())(x)
    chex.assert_tree_all_finite(grad)
    assert StochasticDepth(0.3)(x, rngs=key).dtype == dtype
    assert Dropout(0.3)(x, rngs=key).dtype == dtype


@pytest.mark.parametrize(
    "layer, deterministic",
    [
        (StochasticDepth(0.3, mode="row", scale_by_keep=False), True),
        (StochasticDepth(0.3), False),
        (StochasticDepth(0.0), False),
        (Dropout(0.3), True),
        (Dropout(0.0), False),
    ],
)
def test_integer_input_is_an_error_on_every_path(layer, deterministic):
    x = jnp.arange(12, dtype=jnp.int32).reshape(4, 3)
    with pytest.raises(ValueError, match="floating-point input, got dtype int32"):
        layer(x, deterministic=deterministic, rngs=jax.random.key(0))
