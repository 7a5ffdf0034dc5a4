"""Datasets for training: tfds sources, scikit-learn digits, synthetic data, and augmentation.

Small datasets (digits, synthetic, CIFAR-10/100, SVHN) are loaded once into host memory as
NumPy arrays (:class:`InMemoryData`); each step's batch is a pure function of
``(seed, step)`` (the epoch's permutation is seeded with ``(seed, epoch)``), every host gathers
only its own slice of the global batch, and augmentation (pad + random crop + flip) and
normalisation run inside the jitted train step (:mod:`sdjax.data.augment`). ImageNet streams
from TFRecords with tf.data (:mod:`sdjax.data.imagenet`).

Importing this package does not import TensorFlow; only loading a tfds dataset does.
"""

from sdjax.data.pipeline import (
    InMemoryData,
    batch_indices,
    create,
    epoch_permutation,
)
from sdjax.data.sources import DATASETS, DatasetInfo, check_available, resolve_data_dir

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "InMemoryData",
    "batch_indices",
    "check_available",
    "create",
    "epoch_permutation",
    "resolve_data_dir",
]
