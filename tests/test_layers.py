"""Tests of the Linen layers: Dropout, StochasticDepth and the skip construct DropPathResidual."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from sdjax import ops
from sdjax.layers import Dropout, DropPathResidual, StochasticDepth


def _key(seed=0):
    return jax.random.key(seed)


def _keys_with_gate(rate, want):
    """A key whose batch gate is ``want`` (searched vectorized over 64 fixed keys)."""
    keys = jax.random.split(_key(123), 64)
    gates = np.asarray(jax.vmap(lambda k: ops.batch_keep(k, rate))(keys))
    return keys[int(np.flatnonzero(gates == want)[0])]


class LayerTest(chex.TestCase, parameterized.TestCase):
    @parameterized.parameters(("rngs",), ("rng",))
    def test_key_from_collection_or_argument(self, source):
        x = jnp.ones((64, 3))
        layer = StochasticDepth(rate=0.5)
        if source == "rngs":
            a = layer.apply({}, x, deterministic=False, rngs={"dropout": _key(1)})
            b = layer.apply({}, x, deterministic=False, rngs={"dropout": _key(1)})
            c = layer.apply({}, x, deterministic=False, rngs={"dropout": _key(2)})
            chex.assert_trees_all_equal(a, b)
            self.assertFalse(bool(jnp.array_equal(a, c)))
        else:
            out = layer.apply({}, x, deterministic=False, rng=_key(1))
            chex.assert_trees_all_equal(out, ops.drop_path(x, 0.5, key=_key(1)))
            out = Dropout(0.5).apply({}, x, deterministic=False, rng=_key(1))
            chex.assert_trees_all_equal(out, ops.dropout(x, 0.5, key=_key(1)))

    @parameterized.parameters((Dropout(0.5),), (StochasticDepth(0.5),))
    def test_missing_key_says_how_to_pass_one(self, layer):
        with self.assertRaisesRegex(ValueError, r"rngs=\{'dropout': key\}.*rng=key"):
            layer.apply({}, jnp.ones((4, 3)), deterministic=False)

    def test_deterministic_paths(self):
        x = jax.random.normal(_key(), (8, 3))
        chex.assert_trees_all_equal(Dropout(0.5).apply({}, x, deterministic=True), x)
        chex.assert_trees_all_equal(StochasticDepth(0.5).apply({}, x, deterministic=True), x)
        out = StochasticDepth(0.2, scale_by_keep=False).apply({}, x, deterministic=True)
        chex.assert_trees_all_close(out, x * 0.8)
        # deterministic from the constructor; passing it in both places is an error.
        chex.assert_trees_all_equal(StochasticDepth(0.5, deterministic=True).apply({}, x), x)
        with self.assertRaises(ValueError):
            StochasticDepth(0.5).apply({}, x)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_mode_and_dtype(self):
        x = jnp.ones((16, 4), jnp.bfloat16)
        layer = StochasticDepth(0.5, mode="batch", scale_by_keep=False)
        fn = self.variant(lambda x, k: layer.apply({}, x, deterministic=False, rng=k))
        out = fn(x, _key(3))
        self.assertEqual(out.dtype, jnp.bfloat16)
        self.assertEqual(float(out.min()), float(out.max()))

    @parameterized.parameters(
        (StochasticDepth(0.3, mode="row", scale_by_keep=False), True),
        (StochasticDepth(0.3), False),
        (StochasticDepth(0.0), False),
        (Dropout(0.3), True),
        (Dropout(0.0), False),
    )
    def test_integer_input_is_an_error_on_every_path(self, layer, deterministic):
        x = jnp.arange(12, dtype=jnp.int32).reshape(4, 3)
        with self.assertRaisesRegex(ValueError, "floating-point input, got dtype int32"):
            layer.apply({}, x, deterministic=deterministic, rng=_key())

    @parameterized.parameters(-0.5, 1.5, float("nan"), True, "0.1")
    def test_invalid_rate_at_construction(self, rate):
        for cls in (Dropout, StochasticDepth):
            with self.assertRaisesRegex(ValueError, "rate"):
                cls(rate)
        with self.assertRaisesRegex(ValueError, "mode"):
            StochasticDepth(0.5, mode="rows")


class Branch(nn.Module):
    """A residual branch that owns BatchNorm."""

    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.features)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.relu(x)


class Net(nn.Module):
    rate: float = 0.5
    mode: str = "batch"
    skip_compute: bool = True
    scale_by_keep: bool = True
    branch_factory: bool = False  # pass the branch as a ModuleDef instead of an instance

    @nn.compact
    def __call__(self, x, train: bool, rng=None):
        h = nn.Dense(4)(x)
        h = DropPathResidual(
            functools.partial(Branch, 4) if self.branch_factory else Branch(),
            rate=self.rate,
            mode=self.mode,
            skip_compute=self.skip_compute,
            scale_by_keep=self.scale_by_keep,
        )(h, h, deterministic=not train, rng=rng, train=train)
        return h


X = jax.random.normal(jax.random.key(42), (8, 3))


def _init(net=None):
    return (net or Net()).init(_key(0), X, train=True)


class DropPathResidualTest(chex.TestCase, parameterized.TestCase):
    @parameterized.parameters((False,), (True,))
    def test_branch_adopted_and_initialized(self, branch_factory):
        net = Net(rate=1.0, branch_factory=branch_factory)
        variables = _init(net)  # the branch runs at init whatever the rate
        branch_params = variables["params"]["DropPathResidual_0"]["branch"]
        self.assertEqual(set(branch_params), {"Dense_0", "BatchNorm_0"})
        self.assertIn("branch", variables["batch_stats"]["DropPathResidual_0"])
        self.assertEqual(set(variables["params"]), {"Dense_0", "DropPathResidual_0"})
        # The same parameters drive the batch-mode cond (the kept branch) in both forms.
        key = _keys_with_gate(0.5, True)
        out, _ = Net(rate=0.5, branch_factory=branch_factory).apply(
            variables, X, train=True, rng=key, mutable=["batch_stats"]
        )
        reference, _ = Net(rate=0.5).apply(
            variables, X, train=True, rng=key, mutable=["batch_stats"]
        )
        chex.assert_trees_all_equal(out, reference)

    def test_setup_style_branch(self):
        class SetupNet(nn.Module):
            def setup(self):
                self.res = DropPathResidual(Branch(), rate=0.5, mode="batch")

            def __call__(self, x, train):
                return self.res(x, x, deterministic=not train, rng=_key(1), train=train)

        variables = SetupNet().init(_key(0), jnp.ones((2, 4)), True)
        self.assertIn("branch", variables["params"]["res"])

    @parameterized.parameters(("batch", True), ("row", False))
    def test_compiled_program_has_conditional_only_in_batch_mode(self, mode, has_cond):
        net = Net(mode=mode)
        variables = _init(net)
        text = (
            jax.jit(lambda v, k: net.apply(v, X, train=True, rng=k, mutable=["batch_stats"]))
            .lower(variables, _key(1))
            .as_text()
        )
        found = any(op in text for op in ("stablehlo.case", "stablehlo.if", "mhlo.case"))
        self.assertEqual(found, has_cond)

    @parameterized.parameters((False,), (True,))
    def test_train_step_batch_stats_and_gradients(self, gate):
        """An optax SGD step: a dropped branch is untouched, a kept one updated."""
        net = Net(rate=0.5, mode="batch")
        variables = _init(net)
        key = _keys_with_gate(0.5, gate)
        tx = optax.sgd(0.1)
        params, batch_stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, batch_stats, opt_state, key):
            def loss_fn(params):
                out, updates = net.apply(
                    {"params": params, "batch_stats": batch_stats},
                    X,
                    train=True,
                    rng=key,
                    mutable=["batch_stats"],
                )
                return jnp.sum(out**2), updates["batch_stats"]

            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state, grads

        new_params, new_stats, _, grads = train_step(params, batch_stats, opt_state, key)
        branch_grads = grads["DropPathResidual_0"]["branch"]
        grad_norm = optax.tree.norm(branch_grads)
        old_branch = params["DropPathResidual_0"]["branch"]
        new_branch = new_params["DropPathResidual_0"]["branch"]
        if gate:
            self.assertFalse(
                jax.tree_util.tree_all(
                    jax.tree_util.tree_map(jnp.array_equal, new_stats, batch_stats)
                )
            )
            self.assertGreater(float(grad_norm), 0.0)
        else:  # bit-for-bit unchanged statistics and branch parameters
            chex.assert_trees_all_equal(new_stats, batch_stats)
            chex.assert_trees_all_equal(new_branch, old_branch)
            self.assertEqual(float(grad_norm), 0.0)
        chex.assert_tree_all_finite(grads)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, True), (True, False), (False, True), (False, False))
    def test_equals_masked_version(self, gate, scale_by_keep):
        key = _keys_with_gate(0.4, gate)
        skip = Net(rate=0.4, scale_by_keep=scale_by_keep)
        masked = Net(rate=0.4, scale_by_keep=scale_by_keep, skip_compute=False)
        variables = _init(skip)

        def run(net):
            return self.variant(
                lambda v, k: net.apply(v, X, train=True, rng=k, mutable=["batch_stats"])
            )(variables, key)

        (out_skip, stats_skip), (out_masked, _) = run(skip), run(masked)
        chex.assert_trees_all_close(out_skip, out_masked, rtol=1e-6, atol=1e-6)
        # And the masked version is literally shortcut + ops.drop_path(branch, mode="batch").
        h = nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, X)
        branch_vars = {
            "params": variables["params"]["DropPathResidual_0"]["branch"],
            "batch_stats": variables["batch_stats"]["DropPathResidual_0"]["branch"],
        }
        branch_out, _ = Branch().apply(branch_vars, h, train=True, mutable=["batch_stats"])
        expected = h + ops.drop_path(
            branch_out, 0.4, key=key, mode="batch", scale_by_keep=scale_by_keep
        )
        chex.assert_trees_all_close(out_skip, expected, rtol=1e-6, atol=1e-6)
        if not gate:
            chex.assert_trees_all_equal(stats_skip["batch_stats"], variables["batch_stats"])

    def test_key_from_rngs_collection_and_missing_key(self):
        net = Net()
        variables = _init(net)
        out, _ = net.apply(
            variables, X, train=True, rngs={"dropout": _key(5)}, mutable=["batch_stats"]
        )
        self.assertEqual(out.shape, (8, 4))
        with self.assertRaisesRegex(ValueError, r"rngs=\{'dropout': key\}.*rng=key"):
            net.apply(variables, X, train=True, mutable=["batch_stats"])

    @parameterized.parameters((True,), (False,))
    def test_eval_path(self, scale_by_keep):
        net = Net(rate=0.25, scale_by_keep=scale_by_keep)
        variables = _init(net)
        out = net.apply(variables, X, train=False)
        h = nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, X)
        branch_vars = {
            "params": variables["params"]["DropPathResidual_0"]["branch"],
            "batch_stats": variables["batch_stats"]["DropPathResidual_0"]["branch"],
        }
        branch_out = Branch().apply(branch_vars, h, train=False)
        factor = 1.0 if scale_by_keep else 0.75
        chex.assert_trees_all_close(out, h + factor * branch_out, rtol=1e-6)

    def test_row_mode_masks_per_sample(self):
        net = Net(rate=0.5, mode="row", scale_by_keep=False)
        variables = _init(net)
        out, _ = net.apply(variables, X, train=True, rng=_key(3), mutable=["batch_stats"])
        h = nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, X)
        branch_vars = {
            "params": variables["params"]["DropPathResidual_0"]["branch"],
            "batch_stats": variables["batch_stats"]["DropPathResidual_0"]["branch"],
        }
        # Row mode computes the branch on the whole batch (its batch statistics), then masks.
        branch_out, _ = Branch().apply(branch_vars, h, train=True, mutable=["batch_stats"])
        kept = np.asarray(ops.drop_path(jnp.ones((8,)), 0.5, key=_key(3)) != 0)
        self.assertTrue(kept.any() and not kept.all(), kept)  # some rows kept, some dropped
        expected = h + jnp.where(kept[:, None], branch_out, 0.0)  # dropped rows: the shortcut
        chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
        self.assertTrue(bool(jnp.all(jnp.any(branch_out[kept] != 0, axis=1))))

    def test_traced_rate_in_scan(self):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, xs):
                rate, index = xs
                key = jax.random.fold_in(self.make_rng("dropout"), index)
                res = DropPathResidual(Branch(), rate=rate, mode="batch")
                return res(h, h, deterministic=False, rng=key, train=True), None

        class Stage(nn.Module):
            @nn.compact
            def __call__(self, h, rates):
                scan = nn.scan(
                    Block,
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True, "dropout": False},
                    length=rates.shape[0],
                )
                return scan()(h, (rates, jnp.arange(rates.shape[0])))[0]

        h = jax.random.normal(_key(7), (4, 4))
        rngs = {"params": _key(0), "dropout": _key(1)}
        variables = Stage().init(rngs, h, jnp.zeros(2))
        run = jax.jit(
            lambda r: Stage().apply(variables, h, r, rngs={"dropout": _key(1)}, mutable=True)
        )
        # Rate 0: every block kept, unscaled: h + branch(h), twice.
        out, new = run(jnp.zeros(2))
        block = variables["params"]["ScanBlock_0"]["DropPathResidual_0"]["branch"]
        stats = variables["batch_stats"]["ScanBlock_0"]["DropPathResidual_0"]["branch"]
        expected = h
        for i in range(2):
            branch_vars = jax.tree_util.tree_map(
                lambda leaf, i=i: leaf[i], {"params": block, "batch_stats": stats}
            )
            expected = (
                expected
                + Branch().apply(branch_vars, expected, train=True, mutable=["batch_stats"])[0]
            )
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
        changed = jax.tree_util.tree_map(
            lambda a, b: bool(jnp.any(a != b, axis=tuple(range(1, a.ndim))).all()),
            new["batch_stats"],
            variables["batch_stats"],
        )
        self.assertTrue(all(jax.tree_util.tree_leaves(changed)))  # both blocks ran
        # Rate 1: every block dropped: the identity, statistics untouched.
        out, new = run(jnp.ones(2))
        chex.assert_trees_all_equal(out, h)
        chex.assert_trees_all_equal(new["batch_stats"], variables["batch_stats"])

    def test_shape_mismatch_and_invalid_fields(self):
        with self.assertRaisesRegex(ValueError, "rate"):
            DropPathResidual(Branch(), rate=2.0)
        with self.assertRaisesRegex(ValueError, "mode"):
            DropPathResidual(Branch(), rate=0.5, mode="sample")
        with self.assertRaisesRegex(ValueError, "factory returning one"):
            DropPathResidual(lambda parent: None, rate=0.5)
        net = DropPathResidual(Branch(features=5), rate=0.5)
        with self.assertRaisesRegex(ValueError, "shape"):
            net.init(_key(), jnp.ones((2, 4)), jnp.ones((2, 4)), deterministic=True, train=True)
        net = DropPathResidual(Branch(), rate=0.5, scale_by_keep=False)
        ints = jnp.ones((2, 4), jnp.int32)
        with self.assertRaisesRegex(ValueError, "floating-point shortcut, got dtype int32"):
            net.init(_key(), jnp.ones((2, 4)), ints, deterministic=True, train=True)


if __name__ == "__main__":
    absltest.main()
