"""What the convolution benchmarks share: fixed-key inputs of a case and its PyTorch peer.

A case is ``(x shape NHWC, kernel shape HWIO, stride, feature_group_count)`` with SAME padding.
Inputs are drawn from fixed keys (no other randomness). The PyTorch peer is the same convolution
in PyTorch eager with channels-last tensors (PyTorch's bundled oneDNN on CPU); torch is imported
when a peer is made, so a caller decides when (`onednn_microbench` loads sdjax's oneDNN first).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import conv


def inputs(x_shape, k_shape, stride: int, groups: int, batch: int | None = None):
    """``(x, kernel, cotangent)``: float32 normals from key 0 (kernel scaled by 0.1), the
    cotangent of the output's shape; `batch` replaces the batch size of `x_shape` if given."""
    x_shape = (batch or x_shape[0], *x_shape[1:])
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    kernel = jax.random.normal(kk, k_shape, jnp.float32) * 0.1
    out = jax.eval_shape(
        lambda a, b: conv.conv2d(a, b, strides=stride, feature_group_count=groups, impl="xla"),
        x,
        kernel,
    )
    return x, kernel, jax.random.normal(kc, out.shape, jnp.float32)


def torch_conv(x, kernel, cotangent, stride: int, groups: int, pass_: str) -> Callable[[], object]:
    """A zero-argument callable running the case in PyTorch eager, channels-last.

    Args:
      x, kernel, cotangent: the case's arrays (`inputs`), NHWC / HWIO.
      stride, groups: as the case; padding is ``kernel_size // 2`` (SAME for odd kernels).
      pass_: ``"fwd"`` (forward, in grad mode as in a training step) or ``"fwd+bwd"`` (forward
        and the input and kernel gradients of the cotangent).
    """
    import torch  # noqa: PLC0415 (the `bench` extra; imported when the caller is ready)

    kh = kernel.shape[0]
    # NCHW views of NHWC memory (channels-last), copied into PyTorch-owned (aligned) buffers.
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).clone()
    tk = (
        torch.from_numpy(np.array(kernel))
        .permute(3, 2, 0, 1)
        .contiguous(memory_format=torch.channels_last)
    )
    tg = torch.from_numpy(np.array(cotangent)).permute(0, 3, 1, 2).clone()

    def conv_fn(a, b):
        return torch.nn.functional.conv2d(a, b, stride=stride, padding=kh // 2, groups=groups)

    if pass_ == "fwd":
        return lambda: conv_fn(tx, tk)
    tx_, tk_ = tx.clone().requires_grad_(), tk.clone().requires_grad_()

    def run():
        tx_.grad = tk_.grad = None
        out = conv_fn(tx_, tk_)
        out.backward(tg[:, :, : out.shape[2], : out.shape[3]])
        return out

    return run
