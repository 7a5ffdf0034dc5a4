"""sdjax.conv.conv2d without the oneDNN route: auto falls back, impl="onednn" says how to install.

Runs whether or not oneDNN is installed (the route is made unavailable by patching its status,
or in a child process by an environment without oneDNN or without a compiler).
"""

import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from sdjax import conv, onednn
from sdjax.onednn import conv as onednn_conv


@pytest.fixture
def unavailable(monkeypatch):
    monkeypatch.setattr(
        onednn_conv, "_STATUS", {"reason": f"no oneDNN here; {onednn.INSTALL_HINT}"}
    )


def test_auto_falls_back_to_the_custom_vjp_path(unavailable):
    del unavailable
    assert conv.resolve_impl("auto") == "xla_custom_vjp"
    x = jnp.ones((1, 6, 6, 4))
    kernel = jnp.ones((3, 3, 4, 4))
    text = jax.jit(lambda a, b: conv.conv2d(a, b)).lower(x, kernel).as_text()
    assert "sdjax_onednn" not in text


def test_explicit_onednn_raises_with_install_line(unavailable):
    del unavailable
    with pytest.raises(RuntimeError, match="onednn-cpu-gomp.*C\\+\\+ compiler"):
        conv.conv2d(jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 4)), impl="onednn")


def test_missing_headers_name_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn.library, "_dnnl_prefixes", lambda: [tmp_path])
    with pytest.raises(RuntimeError, match="dnnl.hpp.*onednn-devel-cpu-gomp"):
        onednn.library.library_path()


# A child that trains one step with conv_impl="auto" (a small ResNet, or with argv[1] == "conv"
# just a convolution) and prints which route its convolutions took; the environment it runs
# in decides whether oneDNN is reachable.
_TRAIN_CHILD = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from sdjax import conv, models

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    labels = jnp.array([1, 7])
    if sys.argv[1] == "model":
        model = models.create("cifar_resnet20", conv_impl="auto")
        variables = jax.jit(model.init)(jax.random.key(1), x)
        params = variables["params"]

        def logits_of(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            return logits
    else:
        params = jax.random.normal(jax.random.key(1), (3, 3, 3, 10)) * 0.1

        def logits_of(kernel):
            return jnp.mean(conv.conv2d(x, kernel, strides=2), axis=(1, 2))

    def loss(params):
        logits = logits_of(params)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    step = jax.jit(jax.value_and_grad(loss))
    text = step.lower(params).as_text()
    value, grads = step(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert jnp.isfinite(value) and jnp.isfinite(loss(new)), value
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    conv.conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2)))  # a second shape: no 2nd hint
    print("ROUTE", conv.resolve_impl("auto"), "sdjax_onednn" in text)
    """
)


def _run_child(code, *args, **env):
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.parametrize("why", ["no_onednn", "no_compiler"])
def test_auto_without_onednn_falls_back_to_xla_and_trains_with_one_hint(why, tmp_path):
    """What a user without the wheels (``DNNLROOT`` naming an empty prefix) or without a C++
    compiler gets: the XLA path, a model that trains, and one warning line saying why."""
    (tmp_path / "prefix").mkdir()
    env = {"SDJAX_CACHE_DIR": str(tmp_path / "cache"), "SDJAX_ONEDNN": "1"}
    if why == "no_onednn":
        env["DNNLROOT"] = str(tmp_path / "prefix")
    else:
        env["CXX"] = str(tmp_path / "no-such-c++")
    result = _run_child(_TRAIN_CHILD, "model" if why == "no_onednn" else "conv", **env)
    assert "ROUTE xla_custom_vjp False" in result.stdout, result.stdout
    hints = [line for line in result.stderr.splitlines() if "sdjax.onednn:" in line]
    assert len(hints) == 1, result.stderr[-4000:]
    assert "convolutions use the XLA path" in hints[0]
    assert ("dnnl.hpp" if why == "no_onednn" else "compiler") in hints[0]


def test_failed_build_is_logged_once(monkeypatch, tmp_path, caplog):
    """A compiler that fails (here `false`) leaves the XLA path and one log line, not silence."""
    monkeypatch.setattr(onednn_conv, "_STATUS", {})
    monkeypatch.setattr(onednn.library, "_LOADED", {})
    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level(logging.WARNING, logger="sdjax.onednn"):
        assert not onednn.available()
        assert not onednn.available()
        assert conv.resolve_impl("auto") == "xla_custom_vjp"
    records = [r for r in caplog.records if r.name == "sdjax.onednn"]
    assert len(records) == 1
    assert "compiling the oneDNN handlers failed" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()
    assert "compiling the oneDNN handlers failed" in onednn.unavailable_reason()
