"""sdjax.conv.conv2d without the oneDNN route: auto falls back, impl="onednn" says how to install.

Runs whether or not oneDNN is installed (the route is made unavailable by patching its status).
"""

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


def test_auto_falls_back_to_fast_path(unavailable):
    del unavailable
    assert conv.resolve_impl("auto") == "fast"
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
