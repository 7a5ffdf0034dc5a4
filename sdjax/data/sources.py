"""Dataset sources: what each dataset is, where it lives, and loading it into NumPy arrays.

Images are returned as ``[N, H, W, C]`` arrays (``uint8`` for tfds image datasets and synthetic
data, ``float32`` in [0, 16] for digits) and labels as ``int32 [N]``. TensorFlow is imported only
when a tfds dataset is read from its tfds folder; a dataset given as a ``.npz`` export
(``config.input.npz_path``, written by ``python -m sdjax.data.npz_export``) is read with NumPy
alone (see :mod:`sdjax.data.npz`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

__all__ = ["DATASETS", "DatasetInfo", "check_available", "load_arrays", "resolve_data_dir"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset name in ``config.input.dataset``."""

    tfds_name: str | None  # None: not a tfds dataset
    num_classes: int | None  # None: from the config (synthetic)
    streamed: bool = False  # tf.data streaming (ImageNet) instead of in-memory arrays


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(None, 10),
    "synthetic": DatasetSpec(None, None),
    "cifar10": DatasetSpec("cifar10", 10),
    "cifar100": DatasetSpec("cifar100", 100),
    "svhn_cropped": DatasetSpec("svhn_cropped", 10),
    "imagenet2012": DatasetSpec("imagenet2012", 1000, streamed=True),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop and validation need to know about a dataset.

    Attributes:
      name: the config name (``config.input.dataset``).
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of the images the model sees.
      num_train: training examples before the validation hold-out.
      num_test: test examples.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int


def resolve_data_dir(input_config: Any) -> str | None:
    """``input.data_dir`` if set, else ``$TFDS_DATA_DIR``, else None (the tfds default)."""
    return input_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or None


def _tfds_builder(input_config: Any):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (TF only when needed)

    name = DATASETS[input_config.dataset].tfds_name
    data_dir = resolve_data_dir(input_config)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        where = data_dir or "the tfds default (~/tensorflow_datasets)"
        source = (
            "config.input.data_dir"
            if input_config.get("data_dir")
            else "$TFDS_DATA_DIR"
            if os.environ.get("TFDS_DATA_DIR")
            else "the tfds default, since neither config.input.data_dir nor $TFDS_DATA_DIR is set"
        )
        raise ValueError(
            f"dataset {name!r} (config.input.dataset={input_config.dataset!r}) was not found: "
            f"looked in {builder.data_dir} (data_dir {where}, from {source}). Provide it by "
            f"running `tfds build {name} --data_dir=DIR` on a machine with internet (ImageNet "
            "needs the manual download), then set TFDS_DATA_DIR=DIR or pass "
            "--config.input.data_dir=DIR (a gs://bucket/tensorflow_datasets path works too)."
        )
    return builder


def _split_size(builder, split: str) -> int:
    return int(builder.info.splits[split].num_examples)


def _digits_split(input_config: Any):
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]  # [1797, 8, 8, 1] in [0, 16]
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images,
        labels,
        test_size=input_config.digits_test_size,
        stratify=labels,
        random_state=input_config.split_seed,
    )
    return (x_tr, y_tr), (x_te, y_te)


def _synthetic(input_config: Any):
    """Class-dependent noisy images (learnable), a pure function of ``split_seed``."""
    rng = np.random.default_rng(input_config.split_seed)
    shape = tuple(input_config.synthetic_image_shape)
    k = input_config.synthetic_num_classes
    prototypes = rng.integers(0, 256, size=(k, *shape))

    def make(n):
        labels = rng.integers(0, k, size=n).astype(np.int32)
        noise = rng.integers(-48, 48, size=(n, *shape))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        return images, labels

    return make(input_config.synthetic_num_train), make(input_config.synthetic_num_test)


def check_available(input_config: Any) -> DatasetInfo:
    """Finds the dataset without loading it and returns its :class:`DatasetInfo`.

    Raises:
      ValueError: unknown dataset name, or a tfds dataset not prepared in the data directory (the
        message says where it looked and how to provide the data).
    """
    name = input_config.dataset
    if name not in DATASETS:
        raise ValueError(
            f"config.input.dataset={name!r} is invalid; allowed: one of {list(DATASETS)}."
        )
    if input_config.get("npz_path"):
        from sdjax.data import npz  # noqa: PLC0415

        return npz.check_available(input_config, DATASETS[name].num_classes)
    if name == "digits":
        n_test = int(input_config.digits_test_size)
        return DatasetInfo(name, 10, (8, 8, 1), 1797 - n_test, n_test)
    if name == "synthetic":
        return DatasetInfo(
            name,
            int(input_config.synthetic_num_classes),
            tuple(input_config.synthetic_image_shape),
            int(input_config.synthetic_num_train),
            int(input_config.synthetic_num_test),
        )
    builder = _tfds_builder(input_config)
    spec = DATASETS[name]
    num_train = _split_size(builder, input_config.train_split)
    if name == "svhn_cropped" and input_config.use_extra:
        num_train += _split_size(builder, "extra")
    if spec.streamed:
        size = input_config.image_size or 224
        shape = (size, size, 3)
    else:
        shape = tuple(builder.info.features["image"].shape)
    return DatasetInfo(
        name, spec.num_classes, shape, num_train, _split_size(builder, input_config.test_split)
    )


def load_arrays(input_config: Any):
    """Loads an in-memory dataset.

    Returns:
      ``((train_images, train_labels), (test_images, test_labels))`` as NumPy arrays, in the
      order stored on disk (shuffling is done per epoch by the pipeline).
    """
    name = input_config.dataset
    if input_config.get("npz_path"):
        from sdjax.data import npz  # noqa: PLC0415

        return npz.load_arrays(input_config.npz_path)
    if name == "digits":
        return _digits_split(input_config)
    if name == "synthetic":
        return _synthetic(input_config)
    import tensorflow_datasets as tfds  # noqa: PLC0415

    builder = _tfds_builder(input_config)

    def read(split):
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
        return data["image"], data["label"].astype(np.int32)

    train = read(input_config.train_split)
    if name == "svhn_cropped" and input_config.use_extra:
        extra = read("extra")
        train = (np.concatenate([train[0], extra[0]]), np.concatenate([train[1], extra[1]]))
    return train, read(input_config.test_split)
