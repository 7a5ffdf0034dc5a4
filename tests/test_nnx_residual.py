"""NNX DropPathResidual: the three modes against the ops and the Linen layer, for the same key."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import layers, ops, row_subset
from sdjax.nnx import DropPathResidual


class Branch(nnx.Module):
    """Linear -> (BatchNorm) -> tanh."""

    def __init__(self, rngs: nnx.Rngs, use_norm: bool = True):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.5, rngs=rngs) if use_norm else None

    def __call__(self, h):
        h = self.linear(h)
        if self.norm is not None:
            h = self.norm(h)
        return jnp.tanh(h)


class LinenBranch(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.tanh(nn.Dense(4)(h))


X = jax.random.normal(jax.random.key(1), (8, 4))
SHORTCUT = jax.random.normal(jax.random.key(2), (8, 4))


def _residual(rate=0.5, use_norm=True, **kw):
    return DropPathResidual(Branch(nnx.Rngs(0), use_norm=use_norm), rate, **kw)


def _branch_fn(residual):
    """The residual's branch as a function on a copy of its current state (not written back)."""
    return nnx.clone(residual.branch)


def _batch_stats(residual):
    """A snapshot (NumPy copies) of the branch's BatchNorm statistics."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(residual.branch, nnx.BatchStat)))


@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_row_mode_equals_ops(scale_by_keep):
    residual = _residual(mode="row", scale_by_keep=scale_by_keep, use_norm=False)
    key = jax.random.key(3)
    expected = SHORTCUT + ops.drop_path(
        _branch_fn(residual)(X), 0.5, key=key, mode="row", scale_by_keep=scale_by_keep
    )
    chex.assert_trees_all_close(residual(X, SHORTCUT, rngs=key), expected, rtol=1e-6, atol=1e-6)


def test_batch_mode_skips_dropped_branch_and_leaves_batch_norm_untouched():
    gates = {}
    for seed in range(8):
        key = jax.random.key(seed)
        gates.setdefault(bool(ops.batch_keep(key, 0.5)), key)
    assert set(gates) == {True, False}
    for gate, key in gates.items():
        residual = _residual(mode="batch")
        before = _batch_stats(residual)
        branch_out = _branch_fn(residual)(X)  # training BatchNorm on the whole batch
        out = nnx.jit(lambda r, x, s, k: r(x, s, rngs=k))(residual, X, SHORTCUT, key)
        after = _batch_stats(residual)
        masked = _residual(mode="batch", skip_compute=False)(X, SHORTCUT, rngs=key)
        chex.assert_trees_all_close(out, masked, rtol=1e-6, atol=1e-6)
        if gate:
            chex.assert_trees_all_close(out, SHORTCUT + 2.0 * branch_out, rtol=1e-6, atol=1e-6)
            assert not np.allclose(after["norm"]["mean"], before["norm"]["mean"])
        else:
            chex.assert_trees_all_equal(out, SHORTCUT)
            chex.assert_trees_all_equal(after, before)


def test_row_subset_equals_ops_and_batch_norm_sees_kept_samples():
    residual = _residual(0.6, mode="row_subset")
    key = jax.random.key(4)
    expected = row_subset.row_subset_residual(_branch_fn(residual), X, SHORTCUT, 0.6, key=key)
    kernel = residual.branch.linear.kernel[...]
    bias = residual.branch.linear.bias[...]
    out = residual(X, SHORTCUT, rngs=key)
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
    idx = row_subset.subset_indices(key, 8, row_subset.subset_size(8, 0.6))[0]
    kept_mean = (X[idx] @ kernel + bias).mean(0)
    chex.assert_trees_all_close(residual.branch.norm.mean[...], 0.5 * kept_mean, rtol=1e-5)


def test_row_subset_gradients_skip_dropped_samples():
    residual = _residual(0.5, mode="row_subset", use_norm=False)
    key = jax.random.key(5)

    def loss(residual, x):
        return jnp.sum(residual(x, SHORTCUT, rngs=key) ** 2)

    grads, x_grad = nnx.grad(loss, argnums=(0, 1))(residual, X)
    keep = np.asarray(row_subset.subset_keep(key, 8, 4))
    np.testing.assert_array_equal(np.asarray(x_grad)[~keep], 0.0)
    assert np.all(np.any(np.asarray(x_grad)[keep] != 0, axis=1))
    masked = _residual(0.5, mode="row_subset", use_norm=False, skip_compute=False)
    m_grads, m_x_grad = nnx.grad(loss, argnums=(0, 1))(masked, X)
    chex.assert_trees_all_close(x_grad, m_x_grad, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        nnx.state(grads, nnx.Param), nnx.state(m_grads, nnx.Param), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["row", "batch", "row_subset"])
def test_equals_linen_for_the_same_key(mode):
    residual = _residual(0.5, mode=mode, use_norm=False)
    linen = layers.DropPathResidual(LinenBranch(), rate=0.5, mode=mode)
    params = {
        "branch": {
            "Dense_0": {
                "kernel": residual.branch.linear.kernel[...],
                "bias": residual.branch.linear.bias[...],
            }
        }
    }
    for seed in range(3):
        key = jax.random.key(seed)
        expected = linen.apply({"params": params}, X, SHORTCUT, deterministic=False, rng=key)
        chex.assert_trees_all_close(residual(X, SHORTCUT, rngs=key), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["row", "batch", "row_subset"])
@pytest.mark.parametrize("scale_by_keep, eval_factor", [(True, 1.0), (False, 0.7)])
def test_eval_adds_the_whole_branch_or_its_keep_fraction(mode, scale_by_keep, eval_factor):
    """Eval, rate 0.3: ``shortcut + branch(x)`` with ``scale_by_keep=True`` (the default: training
    scaled the kept branches), ``shortcut + 0.7 * branch(x)`` without; the branch by hand."""
    residual = _residual(0.3, mode=mode, scale_by_keep=scale_by_keep, use_norm=False)
    kernel = np.asarray(residual.branch.linear.kernel[...], np.float64)
    bias = np.asarray(residual.branch.linear.bias[...], np.float64)
    branch = np.tanh(np.asarray(X, np.float64) @ kernel + bias)
    expected = np.asarray(SHORTCUT, np.float64) + eval_factor * branch
    out = residual(X, SHORTCUT, deterministic=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    residual.eval()
    np.testing.assert_allclose(residual(X, SHORTCUT), expected, rtol=1e-5, atol=1e-6)
    run = nnx.jit(lambda r: r(X, SHORTCUT))
    np.testing.assert_allclose(run(residual), expected, rtol=1e-5, atol=1e-6)
    if scale_by_keep:  # the default
        np.testing.assert_allclose(
            _residual(0.3, mode=mode, use_norm=False)(X, SHORTCUT, deterministic=True),
            expected, rtol=1e-5, atol=1e-6,
        )  # fmt: skip


def test_stream_eval_and_array_rate():
    residual = DropPathResidual(
        Branch(nnx.Rngs(0), use_norm=False),
        0.5,
        mode="row_subset",
        scale_by_keep=False,
        rngs=nnx.Rngs(dropout=3),
    )
    a, b = residual(X, SHORTCUT), residual(X, SHORTCUT)
    assert not bool(jnp.array_equal(a, b))  # the stream advances
    residual.eval()
    assert residual.deterministic
    chex.assert_trees_all_close(
        residual(X, SHORTCUT), SHORTCUT + 0.5 * _branch_fn(residual)(X), rtol=1e-6
    )
    static = _residual(0.5, mode="row_subset", use_norm=False)
    traced = _residual(jnp.float32(0.5), mode="row_subset", use_norm=False, min_rate=0.25)
    key = jax.random.key(6)
    run = nnx.jit(lambda r, k: r(X, SHORTCUT, rngs=k))
    chex.assert_trees_all_close(
        run(traced, key), static(X, SHORTCUT, rngs=key), rtol=1e-6, atol=1e-6
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"mode must be one of \('row', 'batch', 'row_subset'\)"):
        _residual(mode="subset")
    for rate in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="rate"):
            _residual(rate)
    with pytest.raises(ValueError, match="needs min_rate"):
        _residual(jnp.float32(0.5), mode="row_subset")
    with pytest.raises(ValueError, match="min_rate=0.6 must be <= rate=0.5"):
        _residual(0.5, mode="row_subset", min_rate=0.6)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1"):
        _residual(0.5, mode="row_subset", num_shards=0)
    with pytest.raises(ValueError, match="must be an nnx.Module"):
        DropPathResidual(lambda h: h, 0.5)
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(dropout=seed\)"):
        _residual()(X, SHORTCUT)
    with pytest.raises(ValueError, match="the branch output has shape"):
        _residual(mode="batch", skip_compute=False)(X, SHORTCUT[:, :3], rngs=jax.random.key(0))
