"""Deterministic batching: the data order is a pure function of ``(seed, epoch)``.

With ``S`` steps per epoch, global step ``s`` reads the examples
``epoch_permutation(seed, s // S, n)[(s % S) * B : (s % S + 1) * B]``. A resumed run (which
knows only its step) therefore sees exactly the batches an uninterrupted run would. Each of the
``process_count`` hosts gathers only its contiguous slice of every global batch, which it feeds
to ``jax.make_array_from_process_local_data``.

The remainder: with ``drop_remainder=True`` (``S = n // B``) the last ``n % B`` examples of
each epoch's permutation are not used in that epoch (a different remainder each epoch); with
``drop_remainder=False`` (``S = ceil(n / B)``, the paper's Torch code) they form the epoch's
last, smaller batch.

Normalisation statistics come from the training part (after the validation hold-out):
``"per_channel"`` (a mean and a std per channel) or ``"pixel_mean_global_std"`` (the paper's
``cifar-dataset.lua``: a mean image and one std of all values, unbiased as Torch's ``std()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from sdjax.data import npz, sources

__all__ = [
    "InMemoryData",
    "batch_indices",
    "create",
    "epoch_permutation",
    "last_batch_size",
    "normalization_stats",
    "split_validation",
    "steps_per_epoch",
]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: ``int64 [num_examples]``.

    A pure function of ``(seed, epoch, num_examples)`` (NumPy's PCG64 seeded with
    ``[seed, epoch]``), independent of devices, hosts and of how the run was resumed.
    """
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """``num_examples // batch_size`` (drop the remainder) or ``ceil(num_examples / batch_size)``.

    Raises:
      ValueError: ``batch_size`` is larger than ``num_examples`` with ``drop_remainder``.
    """
    if drop_remainder:
        if num_examples < batch_size:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the training set ({num_examples})."
            )
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def batch_indices(
    seed: int, step: int, batch_size: int, num_examples: int, drop_remainder: bool = True
) -> np.ndarray:
    """Indices of the global batch of ``step`` (``int64 [batch_size]``, or ``[n % batch_size]``
    for the last batch of an epoch with ``drop_remainder=False``); see the module docstring."""
    epoch_steps = steps_per_epoch(num_examples, batch_size, drop_remainder)
    epoch, i = divmod(int(step), epoch_steps)
    return epoch_permutation(seed, epoch, num_examples)[i * batch_size : (i + 1) * batch_size]


def last_batch_size(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """The size of an epoch's last global batch (``batch_size`` unless a remainder is kept)."""
    rest = num_examples % batch_size
    return batch_size if drop_remainder or rest == 0 else rest


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass
class InMemoryData:
    """A dataset held in host memory, with device-side augmentation settings.

    Attributes:
      info: the dataset's :class:`~sdjax.data.sources.DatasetInfo`.
      train, val, test: ``(images [N, H, W, C], labels int32 [N])``; ``val`` is empty
        (``N = 0``) without a validation split.
      mean, std: normalisation statistics of the training part: per channel (length ``C``
        each), or a mean image (float32 ``[H, W, C]``) and one std (length 1); see
        :func:`normalization_stats`.
      crop_padding, flip: the train-time augmentation done in the jitted step.
      drop_remainder: drop each epoch's last ``N % B`` examples (True) or train on them as a
        smaller last batch (False).
    """

    info: sources.DatasetInfo
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    mean: tuple[float, ...] | np.ndarray
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    drop_remainder: bool = True

    @property
    def num_train(self) -> int:
        return len(self.train[1])

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self.num_train, batch_size, self.drop_remainder)

    def last_batch_size(self, batch_size: int) -> int:
        """The size of each epoch's last global batch (see :func:`last_batch_size`)."""
        return last_batch_size(self.num_train, batch_size, self.drop_remainder)

    def augment_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`sdjax.data.augment.preprocess`."""
        return dict(mean=self.mean, std=self.std, crop_padding=self.crop_padding, flip=self.flip)

    def train_batch(
        self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of the global batch of ``step``: ``{"image", "label"}``.

        The last batch of an epoch is smaller with ``drop_remainder=False``; its size must then
        be a multiple of ``process_count`` (checked by ``sdjax.trainer.build``).
        """
        idx = batch_indices(seed, step, batch_size, self.num_train, self.drop_remainder)
        idx = idx[_local_slice(len(idx), process_index, process_count)]
        return {"image": self.train[0][idx], "label": self.train[1][idx]}

    def train_iterator(
        self,
        seed: int,
        start_step: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields this host's batches for steps ``start_step, start_step + 1, ...``."""
        step = start_step
        while True:
            yield self.train_batch(seed, step, batch_size, process_index, process_count)
            step += 1

    def eval_batches(
        self, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields this host's slices of fixed-size global batches covering ``split`` once.

        The last batch is padded (with copies of example 0) and ``mask`` (bool) marks the real
        examples, so every batch has the same shape (one compilation).
        """
        images, labels = {"val": self.val, "test": self.test}[split]
        n = len(labels)
        local = _local_slice(batch_size, process_index, process_count)
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)
            mask = idx < n
            idx = np.where(mask, idx, 0)[local]
            yield {"image": images[idx], "label": labels[idx], "mask": mask[local]}


def split_validation(train, validation_size: int, split_seed: int, train_size: int = 0):
    """``(train, val)``: the last ``validation_size`` of a permutation seeded with ``split_seed``
    validate; the first ``train_size`` of it (0: all the rest) train. Both keep stored order."""
    images, labels = train
    if validation_size == 0 and train_size == 0:
        empty = (images[:0], labels[:0])
        return train, empty
    order = np.random.default_rng(split_seed).permutation(len(labels))
    rest, held = order[: len(order) - validation_size], order[len(order) - validation_size :]
    keep = np.sort(rest[:train_size] if train_size else rest)
    held = np.sort(held)
    return (images[keep], labels[keep]), (images[held], labels[held])


def normalization_stats(images: np.ndarray, normalization: str = "per_channel"):
    """Normalisation statistics of ``images [N, H, W, C]`` (the training part).

    Args:
      images: any real dtype; sums are accumulated in float64, 1,000 images at a time (no
        float64 copy of the whole set).
      normalization: ``"per_channel"``: per-channel mean and population std (floored at 1e-6),
        tuples of length ``C``. ``"pixel_mean_global_std"``: the mean image (float32
        ``[H, W, C]``) and one std of all ``N * H * W * C`` values about their overall mean,
        with ``N * H * W * C - 1`` degrees of freedom (Torch's ``Tensor:std()``, as
        ``cifar-dataset.lua``), a tuple of length 1.

    Returns:
      ``(mean, std)`` for :func:`sdjax.data.augment.normalize` (0 and 1 for no images).

    Raises:
      ValueError: an unknown ``normalization``.
    """
    if normalization not in ("per_channel", "pixel_mean_global_std"):
        raise ValueError(
            f"config.input.normalization={normalization!r} is invalid; allowed: one of "
            "['per_channel', 'pixel_mean_global_std']."
        )
    if len(images) == 0:  # nothing left to train on: the trainer's checks say so
        if normalization == "per_channel":
            return (0.0,) * images.shape[-1], (1.0,) * images.shape[-1]
        return np.zeros(images.shape[1:], np.float32), (1.0,)
    total = np.zeros(images.shape[1:], np.float64)
    for start in range(0, len(images), 1000):
        total += images[start : start + 1000].sum(0, dtype=np.float64)
    pixel_mean = total / len(images)
    if normalization == "per_channel":
        mean = pixel_mean.reshape(-1, images.shape[-1]).mean(0)
        squares = np.zeros(images.shape[-1], np.float64)
        for start in range(0, len(images), 1000):
            centred = images[start : start + 1000].astype(np.float64) - mean
            squares += (centred**2).reshape(-1, images.shape[-1]).sum(0)
        count = images.size // images.shape[-1]
        std = np.maximum(np.sqrt(squares / count), 1e-6)
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    grand_mean = float(pixel_mean.mean())
    squares = 0.0
    for start in range(0, len(images), 1000):
        squares += float(
            ((images[start : start + 1000].astype(np.float64) - grand_mean) ** 2).sum()
        )
    std = max(float(np.sqrt(squares / max(images.size - 1, 1))), 1e-6)
    return pixel_mean.astype(np.float32), (std,)


def create(input_config: Any):
    """Builds the data for ``config.input``: an :class:`InMemoryData` or, for ImageNet, an
    :class:`sdjax.data.imagenet.StreamedData`.

    Raises:
      ValueError: unknown or missing dataset (see :func:`sources.check_available`).
    """
    info = sources.check_available(input_config)
    if sources.DATASETS[input_config.dataset].streamed:
        from sdjax.data import imagenet  # noqa: PLC0415 (imports TensorFlow)

        return imagenet.StreamedData(input_config, info, IMAGENET_MEAN, IMAGENET_STD)
    train, test = sources.load_arrays(input_config)
    if input_config.get("npz_path") and npz.file_split(input_config.npz_path) is not None:
        # Already split (checked against the config): the training part, then the validation.
        n = len(train[1]) - int(input_config.validation_size)
        train, val = (train[0][:n], train[1][:n]), (train[0][n:], train[1][n:])
    else:
        train, val = split_validation(
            train,
            input_config.validation_size,
            input_config.split_seed,
            int(input_config.get("train_size", 0)),
        )
    channels = train[0].shape[-1]
    if input_config.normalize:
        mean, std = normalization_stats(train[0], input_config.get("normalization", "per_channel"))
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    info = dataclasses.replace(info, num_train=len(train[1]) + len(val[1]))
    return InMemoryData(
        info=info,
        train=train,
        val=val,
        test=test,
        mean=mean,
        std=std,
        crop_padding=int(input_config.augment.crop_padding),
        flip=bool(input_config.augment.flip),
        drop_remainder=bool(input_config.get("drop_remainder", True)),
    )
