"""Deterministic batching: the data order is a pure function of ``(seed, epoch)``.

Global step ``s`` with ``spe`` steps per epoch reads the examples
``epoch_permutation(seed, s // spe, n)[(s % spe) * B : (s % spe + 1) * B]``. A resumed run (which
knows only its step) therefore sees exactly the batches an uninterrupted run would. Each of the
``process_count`` hosts gathers only its contiguous slice of every global batch, which it feeds
to ``jax.make_array_from_process_local_data``. The last ``n % B`` examples of each epoch's
permutation are not used in that epoch (a different remainder each epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from sdjax.data import sources

__all__ = ["InMemoryData", "batch_indices", "create", "epoch_permutation"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: ``int64 [num_examples]``.

    A pure function of ``(seed, epoch, num_examples)`` (NumPy's PCG64 seeded with
    ``[seed, epoch]``), independent of devices, hosts and of how the run was resumed.
    """
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Indices of the global batch of ``step`` (``int64 [batch_size]``); see module docstring."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size={batch_size} is larger than the training set ({num_examples})."
        )
    epoch, i = divmod(int(step), steps_per_epoch)
    return epoch_permutation(seed, epoch, num_examples)[i * batch_size : (i + 1) * batch_size]


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
      mean, std: per-channel normalisation statistics (of the training part), length ``C``.
      crop_padding, flip: the train-time augmentation done in the jitted step.
    """

    info: sources.DatasetInfo
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def num_train(self) -> int:
        return len(self.train[1])

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_train // batch_size

    def augment_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`sdjax.data.augment.preprocess`."""
        return dict(mean=self.mean, std=self.std, crop_padding=self.crop_padding, flip=self.flip)

    def train_batch(
        self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of the global batch of ``step``: ``{"image", "label"}``."""
        idx = batch_indices(seed, step, batch_size, self.num_train)
        idx = idx[_local_slice(batch_size, process_index, process_count)]
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


def _split_validation(train, validation_size: int, split_seed: int):
    images, labels = train
    if validation_size == 0:
        empty = (images[:0], labels[:0])
        return train, empty
    order = np.random.default_rng(split_seed).permutation(len(labels))
    keep, held = np.sort(order[:-validation_size]), np.sort(order[-validation_size:])
    return (images[keep], labels[keep]), (images[held], labels[held])


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
    train, val = _split_validation(train, input_config.validation_size, input_config.split_seed)
    channels = train[0].shape[-1]
    if input_config.normalize:
        pixels = train[0].reshape(-1, channels).astype(np.float64)
        mean = tuple(float(m) for m in pixels.mean(0))
        std = tuple(float(s) for s in np.maximum(pixels.std(0), 1e-6))
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
    )
