"""Tests of sdjax.ops: mask semantics, statistics, edges, dtypes, PRNG impls, validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from sdjax import checks, ops

# Statistical checks use fixed keys and a bound of this many standard deviations.
NUM_SIGMAS = 5.0


def _key(seed=0):
    return jax.random.key(seed)


class CheckRateTest(parameterized.TestCase):
    @parameterized.parameters(0, 0.0, 0.5, 1, 1.0, np.float32(0.25), (np.array(0.75),))
    def test_valid(self, rate):
        value = checks.check_rate(rate)
        self.assertIsInstance(value, float)
        self.assertEqual(value, float(rate))

    @parameterized.parameters(
        -0.1, 1.5, float("nan"), float("inf"), True, False, "0.5", None, ([0.5],)
    )
    def test_invalid_names_value(self, rate):
        with self.assertRaisesRegex(ValueError, r"drop_rate.*\[0, 1\]") as ctx:
            checks.check_rate(rate, name="drop_rate")
        self.assertIn(repr(rate), str(ctx.exception))

    @parameterized.parameters(-0.1, 1.5, float("nan"), True, "0.5")
    def test_ops_reject_invalid_rate(self, rate):
        x = jnp.ones((4, 3))
        with self.assertRaisesRegex(ValueError, "rate"):
            ops.dropout(x, rate, key=_key())
        with self.assertRaisesRegex(ValueError, "rate"):
            ops.drop_path(x, rate, key=_key())

    def test_invalid_mode_and_missing_key(self):
        x = jnp.ones((4, 3))
        with self.assertRaisesRegex(ValueError, "mode.*'row', 'batch'"):
            ops.drop_path(x, 0.5, key=_key(), mode="sample")
        with self.assertRaisesRegex(ValueError, "key"):
            ops.drop_path(x, 0.5, key=None)
        with self.assertRaisesRegex(ValueError, "key"):
            ops.dropout(x, 0.5, key=None)
        # A static rate of 0 needs no key.
        self.assertIs(ops.drop_path(x, 0.0, key=None), x)

    def test_invalid_inputs(self):
        with self.assertRaisesRegex(ValueError, "floating"):
            ops.dropout(jnp.ones((4,), jnp.int32), 0.5, key=_key())
        with self.assertRaisesRegex(ValueError, "broadcast_dims"):
            ops.dropout(jnp.ones((4, 3)), 0.5, key=_key(), broadcast_dims=(2,))
        with self.assertRaisesRegex(ValueError, "rank >= 1"):
            ops.drop_path(jnp.ones(()), 0.5, key=_key())
        with self.assertRaisesRegex(ValueError, "0-d"):
            ops.drop_path(jnp.ones((4,)), jnp.array([0.5]), key=_key())


class BernoulliKeepTest(parameterized.TestCase):
    def test_edges_exact(self):
        self.assertTrue(bool(ops.bernoulli_keep(_key(), (1000,), 1.0).all()))
        self.assertFalse(bool(ops.bernoulli_keep(_key(), (1000,), 0.0).any()))
        traced = jax.jit(lambda p: ops.bernoulli_keep(_key(), (1000,), p))
        self.assertTrue(bool(traced(jnp.float32(1.0)).all()))
        self.assertFalse(bool(traced(jnp.float32(0.0)).any()))

    @parameterized.parameters(0.1, 0.5, 0.9)
    def test_traced_equals_static(self, keep_prob):
        static = ops.bernoulli_keep(_key(3), (4096,), keep_prob)
        traced = jax.jit(lambda p: ops.bernoulli_keep(_key(3), (4096,), p))(jnp.float32(keep_prob))
        # Thresholds agree up to float32 rounding: at most a handful of elements may differ.
        self.assertLessEqual(int((static != traced).sum()), 1)

    def test_batch_keep_is_one_draw(self):
        gate = ops.batch_keep(_key(), 0.5)
        self.assertEqual(gate.shape, ())
        self.assertEqual(gate.dtype, jnp.bool_)

    @parameterized.parameters(0.1, 0.5, 0.9)
    def test_batch_keep_frequency_binomial_bound(self, rate):
        """200,000 keys: the gate keeps with probability 1 - rate within 5 standard errors
        (0.0056 at rate 0.5), for a static and a traced rate."""
        n = 200_000
        keys = jax.random.split(_key(11), n)
        static = jax.jit(jax.vmap(lambda k: ops.batch_keep(k, rate)))(keys)
        traced = jax.jit(jax.vmap(ops.batch_keep, in_axes=(0, None)))(keys, jnp.float32(rate))
        sigma = np.sqrt(rate * (1 - rate) / n)
        for gates in (static, traced):
            self.assertLess(abs(float(gates.mean()) - (1 - rate)), NUM_SIGMAS * sigma)


class DropPathTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.25, 0.8)
    def test_row_whole_samples(self, rate):
        x = jax.random.normal(_key(1), (512, 3, 4, 2))
        fn = self.variant(functools.partial(ops.drop_path, rate=rate, mode="row"))
        out = fn(x, key=_key(2))
        kept = jnp.any(out != 0, axis=(1, 2, 3))
        expected = jnp.where(kept[:, None, None, None], x / (1 - rate), 0.0)
        chex.assert_trees_all_close(out, expected, rtol=1e-6)
        # Both outcomes occur, and every sample is either all kept or all zero.
        self.assertTrue(0 < int(kept.sum()) < x.shape[0])

    @parameterized.parameters(0.1, 0.5, 0.9)
    def test_row_kept_fraction_binomial_bound(self, rate):
        n = 200_000
        out = ops.drop_path(jnp.ones((n, 1)), rate, key=_key(4))
        fraction = float((out != 0).mean())
        sigma = np.sqrt(rate * (1 - rate) / n)
        self.assertLess(abs(fraction - (1 - rate)), NUM_SIGMAS * sigma)

    @parameterized.parameters(("row",), ("batch",))
    def test_expectation_preserved(self, mode):
        rate, n = 0.3, 4096
        x = jnp.full((n, 8), 2.0)
        if mode == "row":
            out = ops.drop_path(x, rate, key=_key(5), mode=mode)
        else:  # Average over many keys, vectorized.
            keys = jax.random.split(_key(5), n)
            out = jax.vmap(lambda k: ops.drop_path(x[0], rate, key=k, mode=mode))(keys)
        sigma = 2.0 * np.sqrt(rate / (1 - rate) / n)
        self.assertLess(abs(float(out.mean()) - 2.0), NUM_SIGMAS * sigma)

    def test_scale_by_keep_false_leaves_kept_values(self):
        x = jax.random.normal(_key(1), (256, 5))
        out = ops.drop_path(x, 0.5, key=_key(2), scale_by_keep=False)
        kept = jnp.any(out != 0, axis=1, keepdims=True)
        chex.assert_trees_all_equal(out, jnp.where(kept, x, 0.0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_same_key_same_mask_different_key_different_mask(self):
        x = jnp.ones((256, 3))
        fn = self.variant(functools.partial(ops.drop_path, rate=0.5))
        a, b, c = fn(x, key=_key(7)), fn(x, key=_key(7)), fn(x, key=_key(8))
        chex.assert_trees_all_equal(a, b)
        self.assertFalse(bool(jnp.array_equal(a, c)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_mode_one_gate(self):
        rate, n = 0.4, 4000
        x = jnp.ones((16, 3))
        keys = jax.random.split(_key(9), n)
        fn = self.variant(
            jax.vmap(lambda k: ops.drop_path(x, rate, key=k, mode="batch", scale_by_keep=False))
        )
        out = fn(keys)
        per_key = out.reshape(n, -1)
        # One gate: every element of an output is the same (all 1 or all 0).
        chex.assert_trees_all_equal(per_key.min(axis=1), per_key.max(axis=1))
        gates = jax.vmap(lambda k: ops.batch_keep(k, rate))(keys)
        chex.assert_trees_all_equal(per_key[:, 0] == 1.0, gates)
        sigma = np.sqrt(rate * (1 - rate) / n)
        self.assertLess(abs(float(gates.mean()) - (1 - rate)), NUM_SIGMAS * sigma)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("row",), ("batch",))
    def test_gradients_masked_and_scaled(self, mode):
        rate = 0.25
        x = jax.random.normal(_key(1), (64, 4))
        fn = self.variant(
            jax.value_and_grad(lambda x, k: ops.drop_path(x, rate, key=k, mode=mode).sum())
        )
        _, grad = fn(x, _key(3))
        kept = ops.drop_path(jnp.ones_like(x), rate, key=_key(3), mode=mode) != 0
        chex.assert_trees_all_close(
            grad, jnp.where(kept, jnp.full_like(x, 1 / (1 - rate)), 0.0), rtol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("row", "drop_path"), ("batch", "drop_path"), ("", "dropout"))
    def test_edges_with_finite_gradients(self, mode, fn_name):
        x = jax.random.normal(_key(1), (8, 3))
        if fn_name == "dropout":
            op = ops.dropout
        else:
            op = functools.partial(ops.drop_path, mode=mode)
        self.assertIs(op(x, 0.0, key=_key()), x)
        self.assertIs(op(x, 0, key=_key()), x)

        def loss(x, rate):
            return op(x, rate, key=_key()).sum()

        for rate in (1.0, jnp.float32(1.0)):  # static and traced
            out = self.variant(lambda x, r=rate: op(x, r, key=_key()))(x)
            chex.assert_trees_all_equal(out, jnp.zeros_like(x))
            grad = self.variant(jax.grad(lambda x, r=rate: loss(x, r)))(x)
            chex.assert_tree_all_finite(grad)
            chex.assert_trees_all_equal(grad, jnp.zeros_like(x))
        # Traced rate 0: identity, gradient one; gradient w.r.t. the rate itself is finite.
        out = self.variant(lambda x, r: op(x, r, key=_key()))(x, jnp.float32(0.0))
        chex.assert_trees_all_equal(out, x)
        for r in (0.0, 1.0):
            grad_rate = jax.grad(lambda r: loss(x, r), argnums=0)(jnp.float32(r))
            chex.assert_tree_all_finite(grad_rate)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("row",), ("batch",))
    def test_traced_rate_matches_static(self, mode):
        x = jax.random.normal(_key(1), (128, 3))
        fn = self.variant(lambda x, r: ops.drop_path(x, r, key=_key(2), mode=mode))
        for rate in (0.25, 0.5, 0.75):  # exactly representable: identical thresholds
            chex.assert_trees_all_close(
                fn(x, jnp.float32(rate)), ops.drop_path(x, rate, key=_key(2), mode=mode)
            )

    @parameterized.parameters(jnp.bfloat16, jnp.float16, jnp.float32)
    def test_dtypes_preserved(self, dtype):
        x = jnp.ones((32, 4), dtype)
        for out in (
            ops.drop_path(x, 0.3, key=_key(), mode="row"),
            ops.drop_path(x, 0.3, key=_key(), mode="batch"),
            ops.drop_path(x, jnp.float32(0.3), key=_key()),
            ops.dropout(x, 0.3, key=_key()),
            ops.dropout(x, jnp.float32(0.3), key=_key()),
            ops.drop_path(x, 1.0, key=_key()),
        ):
            self.assertEqual(out.dtype, dtype)
            self.assertEqual(out.shape, x.shape)

    @parameterized.parameters(
        *[(impl,) for impl in ("threefry2x32", "rbg", "unsafe_rbg")],
        *[("legacy_" + impl,) for impl in ("threefry2x32", "rbg", "unsafe_rbg")],
    )
    def test_every_prng_impl(self, impl):
        if impl.startswith("legacy_"):
            # Raw uint32 keys are read with the default implementation, so set it.
            with jax.default_prng_impl(impl.removeprefix("legacy_")):
                key, key2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
                self._check_keys(key, key2)
        else:
            self._check_keys(jax.random.key(0, impl=impl), jax.random.key(1, impl=impl))

    def _check_keys(self, key, key2):
        x = jnp.ones((512, 2))
        out = jax.jit(lambda x, k: ops.drop_path(x, 0.5, key=k))(x, key)
        kept = out[:, 0] != 0
        chex.assert_trees_all_equal(out, jnp.where(kept[:, None], x * 2.0, 0.0))
        self.assertLess(abs(float(kept.mean()) - 0.5), NUM_SIGMAS * np.sqrt(0.25 / 512))
        self.assertFalse(bool(jnp.array_equal(out, ops.drop_path(x, 0.5, key=key2))))
        chex.assert_trees_all_equal(out, ops.drop_path(x, 0.5, key=key))
        self.assertEqual(ops.dropout(x, 0.5, key=key).shape, x.shape)
        self.assertEqual(ops.batch_keep(key, 0.5).shape, ())


class DropoutTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_elementwise_and_expectation(self):
        rate, n = 0.3, 200_000
        x = jnp.ones((n,))
        out = self.variant(functools.partial(ops.dropout, rate=rate))(x, key=_key(1))
        kept = out != 0
        chex.assert_trees_all_close(out, jnp.where(kept, 1 / (1 - rate), 0.0), rtol=1e-6)
        sigma = np.sqrt(rate / (1 - rate) / n)
        self.assertLess(abs(float(out.mean()) - 1.0), NUM_SIGMAS * sigma)
        self.assertLess(
            abs(float(kept.mean()) - (1 - rate)), NUM_SIGMAS * np.sqrt(rate * (1 - rate) / n)
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((1, -2),), ((),))
    def test_broadcast_dims(self, dims):
        x = jnp.ones((16, 5, 6, 3))
        out = self.variant(functools.partial(ops.dropout, rate=0.5, broadcast_dims=dims))(
            x, key=_key(3)
        )
        normalized = tuple(d % x.ndim for d in dims)
        for axis in normalized:  # constant along every broadcast axis
            chex.assert_trees_all_equal(out.min(axis=axis), out.max(axis=axis))
        other = tuple(a for a in range(x.ndim) if a not in normalized)
        # and varying along the others
        self.assertTrue(bool((out.min(axis=other) != out.max(axis=other)).any()) or not other)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_masked_and_scaled(self):
        x = jax.random.normal(_key(1), (32, 8))
        grad = self.variant(jax.grad(lambda x: ops.dropout(x, 0.5, key=_key(2)).sum()))(x)
        kept = ops.dropout(jnp.ones_like(x), 0.5, key=_key(2)) != 0
        chex.assert_trees_all_close(grad, jnp.where(kept, 2.0, 0.0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_same_and_different_keys(self):
        x = jnp.ones((64, 8))
        fn = self.variant(functools.partial(ops.dropout, rate=0.5))
        chex.assert_trees_all_equal(fn(x, key=_key(1)), fn(x, key=_key(1)))
        self.assertFalse(bool(jnp.array_equal(fn(x, key=_key(1)), fn(x, key=_key(2)))))


if __name__ == "__main__":
    absltest.main()
