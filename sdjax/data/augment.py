"""Augmentation and normalisation as pure JAX functions, run inside the jitted train step.

All functions take a batch ``images: [B, H, W, C]`` (any real dtype) and return ``float32``
``[B, H, W, C]``. Randomness comes only from the ``key`` argument: the numbers are drawn for the
whole global batch, so with the default partitionable threefry keys the result does not depend on
how the batch is sharded over devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["normalize", "preprocess", "random_crop", "random_flip"]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(images - mean) / std`` per channel, as float32. ``mean``/``std``: length ``C``."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def random_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    """Zero-pads each image by ``padding`` pixels per side and crops back to ``H x W``.

    The crop offsets ``(dy, dx)`` are uniform in ``[0, 2 * padding]`` per image (the paper's
    CIFAR augmentation with ``padding=4``). ``padding=0`` returns ``images`` unchanged.
    """
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop_one)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Flips each image left-right with probability 1/2 (one draw per image)."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def preprocess(
    images: jax.Array,
    key: jax.Array | None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 0,
    flip: bool = False,
) -> jax.Array:
    """Normalises, then (when ``key`` is given) randomly crops and flips a batch.

    Normalisation comes first so that crop padding is zero in normalised space (the mean pixel),
    as in the paper's Torch code.

    Args:
      images: ``[B, H, W, C]`` raw images (``uint8`` or float).
      key: PRNG key for the augmentation; ``None`` = evaluation (normalise only).
      mean, std: per-channel statistics, length ``C``.
      crop_padding: pixels of zero padding before the random crop (0 = no crop).
      flip: random horizontal flips.

    Returns:
      ``float32 [B, H, W, C]``.
    """
    x = normalize(images, mean, std)
    if key is None:
        return x
    crop_key, flip_key = jax.random.split(key)
    x = random_crop(x, crop_key, crop_padding)
    if flip:
        x = random_flip(x, flip_key)
    return x
