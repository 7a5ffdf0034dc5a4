"""Row-subset stochastic depth: the ops (subset draws, the residual op) and the Linen layer."""

import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from sdjax import row_subset
from sdjax.layers import DropPathResidual

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

W = jax.random.normal(jax.random.key(7), (4, 4)) / 2.0


def per_sample_branch(w, h):
    """A branch that treats samples independently (no BatchNorm)."""
    return jnp.tanh(h @ w.astype(h.dtype))


def _key(seed=0):
    return jax.random.key(seed)


def _inputs(batch=8, dtype=jnp.float32):
    x = jax.random.normal(_key(1), (batch, 4)).astype(dtype)
    shortcut = jax.random.normal(_key(2), (batch, 4)).astype(dtype)
    return x, shortcut


def _subset(w, x, shortcut, rate, key, **kw):
    return row_subset.row_subset_residual(
        lambda h: per_sample_branch(w, h), x, shortcut, rate, key=key, **kw
    )


class SubsetDrawTest(chex.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        (10, 0.0, 10),
        (10, 0.4, 6),
        (10, 0.5, 5),
        (3, 0.5, 2),  # 1.5 rounds half up
        (10, 0.99, 1),  # at least one sample below rate 1
        (1, 0.9, 1),
        (10, 1.0, 0),  # rate 1: the branch is always dropped
        (128, 0.25, 96),
    )
    def test_subset_size(self, batch, rate, k):
        self.assertEqual(row_subset.subset_size(batch, rate), k)

    def test_traced_subset_size_equals_static(self):
        rates = np.linspace(0.0, 1.0, 201).astype(np.float32)
        for batch in (1, 2, 3, 7, 8, 10, 64, 100, 128):
            traced = jax.vmap(lambda r, b=batch: row_subset._traced_subset_size(b, r, b))(rates)
            static = [row_subset.subset_size(batch, float(r)) for r in rates]
            np.testing.assert_array_equal(np.asarray(traced), static)

    def test_bad_sizes_and_rates(self):
        for batch in (0, -1, 2.5, True, None):
            with self.assertRaisesRegex(ValueError, "batch must be an integer >= 1"):
                row_subset.subset_size(batch, 0.5)
        for rate in (-0.1, 1.5, float("nan"), "0.5"):
            with self.assertRaisesRegex(ValueError, "rate"):
                row_subset.subset_size(8, rate)
        with self.assertRaisesRegex(ValueError, r"k=5 must be in \[0, 4\]"):
            row_subset.subset_indices(_key(), 8, 5, num_shards=2)
        with self.assertRaisesRegex(ValueError, "k must be an integer >= 0"):
            row_subset.subset_indices(_key(), 8, -1)
        with self.assertRaisesRegex(ValueError, "num_shards=3 must divide the batch size 8"):
            row_subset.subset_indices(_key(), 8, 1, num_shards=3)
        with self.assertRaisesRegex(ValueError, "num_shards must be an integer >= 1"):
            row_subset.subset_indices(_key(), 8, 1, num_shards=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_indices_distinct_in_range_and_nested(self):
        draw = self.variant(
            row_subset.subset_indices, static_argnums=(1, 2), static_argnames="num_shards"
        )
        for shards in (1, 2):
            idx = np.asarray(draw(_key(3), 12, 5, num_shards=shards))
            self.assertEqual(idx.shape, (shards, 5))
            self.assertEqual(idx.dtype, np.int32)
            for row in idx:
                self.assertEqual(len(set(row.tolist())), 5)
                self.assertTrue(((0 <= row) & (row < 12 // shards)).all())
            for j in (0, 1, 3):  # the subset of size j is the first j of the draw
                np.testing.assert_array_equal(
                    np.asarray(draw(_key(3), 12, j, num_shards=shards)), idx[:, :j]
                )

    def test_rank_top_k_equals_lax_top_k(self):
        bits = jax.random.bits(_key(4), (3, 33), jnp.uint32)
        bits = bits.at[0, 4].set(bits[0, 20]).at[2].set(7)  # ties: the lower index first
        for k in (0, 1, 9, 33):
            np.testing.assert_array_equal(
                np.asarray(row_subset._top_k_indices_by_rank(bits, k)),
                np.asarray(jax.lax.top_k(bits, k)[1]),
            )

    @parameterized.parameters(1, 2)
    def test_inclusion_frequency_is_k_over_batch(self, shards):
        """40,000 draws of k = 5 per shard: every sample's inclusion frequency is within 5
        standard errors of k / local (0.012 for 16 samples), and a chi-square test of the
        per-sample counts finds no preference (a draw that keeps sample 0 more often than
        sample 15, e.g. top-k of coarse random bits with ties to the lower index, fails)."""
        from scipy import stats

        batch, k, draws = 16, 5, 40_000
        local = batch // shards
        keys = jax.random.split(_key(5), draws)
        keep = jax.jit(
            jax.vmap(lambda key: row_subset.subset_keep(key, batch, k, num_shards=shards))
        )(keys)
        keep = np.asarray(keep).reshape(draws, shards, local)
        self.assertTrue((keep.sum(axis=2) == k).all())  # exactly k per shard, every draw
        p = k / local
        freq = keep.mean(axis=0)
        bound = 5.0 * np.sqrt(p * (1 - p) / draws)
        self.assertLess(np.abs(freq - p).max(), bound)
        for counts in keep.sum(axis=0):  # per shard; each count is Binomial(draws, p)
            self.assertGreater(stats.chisquare(counts).pvalue, 1e-3)
        if shards == 2:  # the shards draw different subsets
            self.assertGreater(np.mean(np.any(keep[:, 0] != keep[:, 1], axis=1)), 0.5)


class RowSubsetResidualTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, 1), (False, 1), (True, 2), (False, 2))
    def test_equals_masked_computation_values_and_gradients(self, scale_by_keep, shards):
        """Rate 0.6 on 8 samples: k = round(0.4 * L) kept per shard of L, scaled by L / k (by
        hand: 8 / 3 on one shard, 4 / 2 on two) with ``scale_by_keep``, by 1 without."""
        x, shortcut = _inputs()
        rate, key = 0.6, _key(3)
        k, scale = {1: (3, 8 / 3), 2: (2, 2.0)}[shards]
        self.assertEqual(row_subset.subset_size(8 // shards, rate), k)
        keep = row_subset.subset_keep(key, 8, k, num_shards=shards)[:, None]
        scale = scale if scale_by_keep else 1.0

        def masked(w, x, shortcut):
            return shortcut + jnp.where(keep, per_sample_branch(w, x) * scale, 0.0)

        def subset(w, x, shortcut, skip_compute=True):
            return _subset(
                w,
                x,
                shortcut,
                rate,
                key,
                scale_by_keep=scale_by_keep,
                num_shards=shards,
                skip_compute=skip_compute,
            )

        def loss(fn):
            return lambda *args: jnp.sum(fn(*args) ** 2)

        expected = masked(W, x, shortcut)
        expected_grads = jax.grad(loss(masked), argnums=(0, 1, 2))(W, x, shortcut)
        for skip in (True, False):
            fn = self.variant(lambda w, x, s, skip=skip: subset(w, x, s, skip))
            chex.assert_trees_all_close(fn(W, x, shortcut), expected, rtol=1e-6, atol=1e-6)
            grads = self.variant(jax.grad(loss(fn), argnums=(0, 1, 2)))(W, x, shortcut)
            chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
            # Dropped samples receive no gradient through the branch (x feeds only the branch).
            np.testing.assert_array_equal(np.asarray(grads[1])[~np.asarray(keep[:, 0])], 0.0)

    def test_branch_runs_on_exactly_k_samples(self):
        seen = []

        def branch(h):
            seen.append(h.shape)
            return jnp.ones_like(h)

        x = jnp.arange(12.0)[:, None] * jnp.ones((12, 3))
        out = row_subset.row_subset_residual(branch, x, jnp.zeros((12, 3)), 0.5, key=_key(2))
        self.assertEqual(seen, [(6, 3)])
        rows = np.asarray(out)
        self.assertEqual(int((rows != 0).all(axis=1).sum()), 6)
        np.testing.assert_array_equal(np.unique(rows), [0.0, 2.0])  # scale 12 / 6
        # The branch input holds the drawn samples.
        idx = row_subset.subset_indices(_key(2), 12, 6)[0]
        taken = []
        row_subset.row_subset_residual(
            lambda h: taken.append(h) or h, x, x, 0.5, key=_key(2), scale_by_keep=False
        )
        np.testing.assert_array_equal(np.asarray(taken[0]), np.asarray(x[idx]))

    def test_rate_zero_and_one_edges(self):
        x, shortcut = _inputs()
        seen = []

        def branch(h):
            seen.append(h.shape)
            return per_sample_branch(W, h)

        full = row_subset.row_subset_residual(branch, x, shortcut, 0.0, key=None)
        chex.assert_trees_all_close(full, shortcut + per_sample_branch(W, x))
        tiny = row_subset.row_subset_residual(branch, x, shortcut, 0.01, key=None)  # k rounds to 8
        chex.assert_trees_all_equal(tiny, full)
        self.assertEqual(seen, [(8, 4), (8, 4)])  # the whole batch, no gather

        def never(h):
            raise AssertionError("the branch must not run at rate 1")

        chex.assert_trees_all_equal(
            row_subset.row_subset_residual(never, x, shortcut, 1.0, key=None), shortcut
        )
        # Traced rate 1 with min_rate < 1: the k_max samples are all masked out.
        out = jax.jit(lambda r: _subset(W, x, shortcut, r, _key(), min_rate=0.5))(jnp.float32(1))
        chex.assert_trees_all_equal(out, shortcut)

    @chex.variants(with_jit=True, without_jit=True)
    def test_traced_rate_equals_static_rate(self):
        x, shortcut = _inputs(batch=10)
        for rate in (0.15, 0.4, 0.5, 0.75, 0.9):
            static = _subset(W, x, shortcut, rate, _key(6))
            traced = self.variant(
                lambda r: _subset(W, x, shortcut, r, _key(6), min_rate=0.1, num_shards=1)
            )(jnp.float32(rate))
            chex.assert_trees_all_close(traced, static, rtol=1e-6, atol=1e-6)

    def test_scanned_blocks_equal_unrolled(self):
        """Blocks of different rates share one scan body (padded to the largest k)."""
        rates = (0.2, 0.35, 0.5, 0.7)
        ws = jnp.stack([W * (i + 1) / 2 for i in range(len(rates))])
        x, _ = _inputs(batch=12)
        key = _key(8)

        def unrolled(ws, h):
            for i, rate in enumerate(rates):
                k = jax.random.fold_in(key, i)
                h = _subset(ws[i], h, h, rate, k, num_shards=2)
            return h

        def scanned(ws, h):
            def body(h, xs):
                w, rate, i = xs
                k = jax.random.fold_in(key, i)
                return _subset(w, h, h, rate, k, num_shards=2, min_rate=min(rates)), None

            xs = (ws, jnp.asarray(rates, jnp.float32), jnp.arange(len(rates)))
            return jax.lax.scan(body, h, xs)[0]

        chex.assert_trees_all_close(jax.jit(scanned)(ws, x), unrolled(ws, x), rtol=1e-5)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(scanned(*a) ** 2), argnums=(0, 1)))(ws, x)
        expected = jax.grad(lambda *a: jnp.sum(unrolled(*a) ** 2), argnums=(0, 1))(ws, x)
        chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-4)  # |grads| ~ 100

    def test_remat_and_bf16(self):
        x, shortcut = _inputs(dtype=jnp.bfloat16)

        def fn(w, x):
            return _subset(w, x, shortcut, 0.5, _key(9))

        out = jax.jit(fn)(W, x)
        self.assertEqual(out.dtype, jnp.bfloat16)
        keep = row_subset.subset_keep(_key(9), 8, 4)[:, None]
        masked = shortcut + jnp.where(keep, per_sample_branch(W, x) * 2.0, 0.0)
        chex.assert_trees_all_equal(out, masked.astype(jnp.bfloat16))
        loss = lambda f: lambda w, x: jnp.sum(f(w, x).astype(jnp.float32) ** 2)  # noqa: E731
        grads = jax.jit(jax.grad(loss(jax.checkpoint(fn)), argnums=(0, 1)))(W, x)
        chex.assert_trees_all_equal(grads, jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(W, x))
        self.assertEqual(grads[1].dtype, jnp.bfloat16)

    def test_errors(self):
        x, shortcut = _inputs()
        with self.assertRaisesRegex(ValueError, "needs min_rate"):
            jax.jit(lambda r: _subset(W, x, shortcut, r, _key()))(jnp.float32(0.5))
        with self.assertRaisesRegex(ValueError, r"min_rate=0.6 must be <= rate=0.5"):
            _subset(W, x, shortcut, 0.5, _key(), min_rate=0.6)
        with self.assertRaisesRegex(ValueError, "min_rate must be in"):
            _subset(W, x, shortcut, 0.5, _key(), min_rate=-1.0)
        with self.assertRaisesRegex(ValueError, "rate must be in"):
            _subset(W, x, shortcut, 1.2, _key())
        with self.assertRaisesRegex(ValueError, "same batch size"):
            _subset(W, x, shortcut[:4], 0.5, _key())
        with self.assertRaisesRegex(ValueError, "num_shards=3 must divide the batch size 8"):
            _subset(W, x, shortcut, 0.5, _key(), num_shards=3)
        with self.assertRaisesRegex(ValueError, "needs a PRNG key"):
            _subset(W, x, shortcut, 0.5, None)
        with self.assertRaisesRegex(ValueError, "floating-point"):
            _subset(W, x, shortcut.astype(jnp.int32), 0.5, _key())
        with self.assertRaisesRegex(ValueError, r"branch output has shape \(4, 3\)"):
            row_subset.row_subset_residual(lambda h: h[:, :3], x, shortcut, 0.5, key=_key())


class Branch(nn.Module):
    """Dense -> BatchNorm: a branch whose BatchNorm sees the samples it is run on."""

    use_norm: bool = True

    @nn.compact
    def __call__(self, h, train: bool = True):
        h = nn.Dense(4)(h)
        if self.use_norm:
            h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
        return jnp.tanh(h)


def _layer(rate, **kw):
    return DropPathResidual(Branch(use_norm=kw.pop("use_norm", True)), rate=rate, **kw)


class DropPathResidualRowSubsetTest(chex.TestCase, parameterized.TestCase):
    def test_equals_op_and_batch_norm_sees_kept_samples(self):
        x, shortcut = _inputs(batch=10)
        layer = _layer(0.6, mode="row_subset")
        variables = layer.init(_key(0), x, shortcut, deterministic=True)
        out, new = layer.apply(
            variables, x, shortcut, deterministic=False, rng=_key(3), mutable=["batch_stats"]
        )
        params = variables["params"]["branch"]

        def branch(h):
            return Branch().apply(
                {"params": params, "batch_stats": variables["batch_stats"]["branch"]},
                h,
                mutable=["batch_stats"],
            )[0]

        chex.assert_trees_all_close(
            out, row_subset.row_subset_residual(branch, x, shortcut, 0.6, key=_key(3)), rtol=1e-6
        )
        idx = row_subset.subset_indices(_key(3), 10, 4)[0]
        dense = x[idx] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        chex.assert_trees_all_close(  # momentum 0.5: half the mean over the 4 kept samples
            new["batch_stats"]["branch"]["BatchNorm_0"]["mean"], 0.5 * dense.mean(0), rtol=1e-5
        )

    def test_per_sample_branch_equals_masked_and_eval_path(self):
        x, shortcut = _inputs()
        layer = _layer(0.5, mode="row_subset", scale_by_keep=False, use_norm=False)
        masked = _layer(0.5, mode="row_subset", scale_by_keep=False, use_norm=False)
        masked = masked.clone(skip_compute=False)
        variables = layer.init(_key(0), x, shortcut, deterministic=True)
        run = lambda m: m.apply(variables, x, shortcut, deterministic=False, rng=_key(4))  # noqa: E731
        chex.assert_trees_all_close(run(layer), run(masked), rtol=1e-6)
        h = Branch(use_norm=False).apply({"params": variables["params"]["branch"]}, x)
        chex.assert_trees_all_close(
            layer.apply(variables, x, shortcut, deterministic=True), shortcut + 0.5 * h, rtol=1e-6
        )

    def test_scanned_stage_equals_unrolled_with_remat(self):
        rates = (0.25, 0.5, 0.75)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, xs, key):
                rate, index = xs
                res = DropPathResidual(
                    Branch(use_norm=False),
                    rate=rate,
                    mode="row_subset",
                    min_rate=min(rates),
                    num_shards=2,
                )
                return res(h, h, deterministic=False, rng=jax.random.fold_in(key, index)), None

        class Scanned(nn.Module):
            @nn.compact
            def __call__(self, h, key):
                scan = nn.scan(
                    nn.remat(Block),
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=(0, nn.broadcast),
                    length=len(rates),
                )
                xs = (jnp.asarray(rates, jnp.float32), jnp.arange(len(rates)))
                return scan(name="blocks")(h, xs, key)[0]

        x = jax.random.normal(_key(1), (12, 4))
        key = _key(2)
        variables = Scanned().init(_key(0), x, key)
        stacked = variables["params"]["blocks"]["DropPathResidual_0"]["branch"]

        def unrolled(params, h):
            for i, rate in enumerate(rates):
                p = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], params)
                h = row_subset.row_subset_residual(
                    lambda rows, p=p: Branch(use_norm=False).apply({"params": p}, rows),
                    h,
                    h,
                    rate,
                    key=jax.random.fold_in(key, i),
                    num_shards=2,
                )
            return h

        out = jax.jit(lambda v: Scanned().apply(v, x, key))(variables)
        chex.assert_trees_all_close(out, unrolled(stacked, x), rtol=1e-5, atol=1e-6)

    def test_invalid_fields(self):
        with self.assertRaisesRegex(ValueError, r"mode must be one of \('row', 'batch', 'row_"):
            _layer(0.5, mode="subset")
        with self.assertRaisesRegex(ValueError, "min_rate=0.6 must be <= rate=0.5"):
            _layer(0.5, mode="row_subset", min_rate=0.6)
        with self.assertRaisesRegex(ValueError, "num_shards must be an integer >= 1"):
            _layer(0.5, mode="row_subset", num_shards=0)
        with self.assertRaisesRegex(ValueError, "needs min_rate"):
            _layer(jnp.float32(0.5), mode="row_subset")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sdjax import row_subset

    assert jax.device_count() == 2, jax.devices()
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    w = jnp.full((16, 16), 0.1)
    def f(x, key):
        return row_subset.row_subset_residual(
            lambda h: jnp.tanh(h @ w), x, x, 0.5, key=key, num_shards=2)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    xs = jax.device_put(x, sharding)
    key = jax.random.key(3)
    for fn in (jax.jit(f), jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2)))):
        hlo = fn.lower(xs, key).compile().as_text()
        for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
            assert op not in hlo, op
        np.testing.assert_allclose(np.asarray(fn(xs, key)), np.asarray(fn(x, key)), rtol=1e-6)
    out = jax.jit(f)(xs, key)
    assert out.sharding.is_equivalent_to(sharding, out.ndim), out.sharding
    # The shards draw different subsets (the rows that got the branch differ per shard).
    differ = []
    for seed in range(4):
        got = np.any(np.asarray(jax.jit(f)(xs, jax.random.key(seed))) != np.asarray(x), axis=1)
        assert got.reshape(2, 4).sum(axis=1).tolist() == [2, 2], got
        differ.append(bool(np.any(got[:4] != got[4:])))
    assert any(differ), differ
    print("OK")
    """
)


class ShardedBatchTest(absltest.TestCase):
    def test_sharded_batch_has_no_collectives(self):
        """Two CPU devices in a fresh process: shard-local gather/scatter, different subsets."""
        env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        result = subprocess.run(
            [sys.executable, "-c", SHARDED_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)


if __name__ == "__main__":
    absltest.main()
