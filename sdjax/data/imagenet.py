"""ImageNet (imagenet2012) streamed from TFRecords with tf.data.

Each host reads only its own ``1 / process_count`` of every split (``tfds.even_splits``). Training
uses the standard Inception-style crop (random area 8%-100%, aspect 3/4-4/3) resized to
``image_size`` plus a random horizontal flip; evaluation uses a central crop of
0.875 of the shorter side resized to ``image_size``. Normalisation happens in the jitted step.

Order: epoch ``e`` shuffles this host's files and records with a seed derived from
``(seed, e, process_index)``; a resumed run skips the already-consumed records of its epoch (before
decoding), so it sees the same examples (the shuffle-buffer contents make the order approximate,
not bitwise, across tf.data versions). The crop and flip of an example are stateless, drawn from
a key of ``(that seed, the example's position in the epoch)``: a rerun and a resumed run draw the
same ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdjax.data import sources

__all__ = ["StreamedData"]

CROP_FRACTION = 0.875


def _decode_and_random_crop(image_bytes: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Inception crop drawn statelessly from ``seed`` (int64 ``[2]``): a pure function of it."""
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        seed=seed,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
    return tf.image.resize(image, [size, size], method="bicubic")


def _decode_and_center_crop(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.io.extract_jpeg_shape(image_bytes)
    h, w = shape[0], shape[1]
    crop = tf.cast(CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    y, x = (h - crop + 1) // 2, (w - crop + 1) // 2
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, crop, crop]), channels=3)
    return tf.image.resize(image, [size, size], method="bicubic")


class StreamedData:
    """Streaming ImageNet with the same interface as :class:`sdjax.data.InMemoryData`."""

    def __init__(self, input_config: Any, info: sources.DatasetInfo, mean, std):
        self.input_config = input_config
        self.info = info
        self.mean, self.std = tuple(mean), tuple(std)
        self.size = info.image_shape[0]
        self.builder = sources._tfds_builder(input_config)
        self.val = (np.zeros((0, *info.image_shape), np.uint8), np.zeros((0,), np.int32))

    @property
    def num_train(self) -> int:
        return self.info.num_train

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_train // batch_size

    def augment_kwargs(self) -> dict[str, Any]:
        return dict(mean=self.mean, std=self.std, crop_padding=0, flip=False)

    def _records(self, split: str, process_index: int, process_count: int, **kw):
        shard = tfds.even_splits(split, n=process_count)[process_index]
        return self.builder.as_dataset(
            split=shard, decoders={"image": tfds.decode.SkipDecoding()}, **kw
        )

    def train_iterator(
        self, seed: int, start_step: int, batch_size: int, process_index=0, process_count=1
    ) -> Iterator[dict[str, np.ndarray]]:
        local = batch_size // process_count
        steps_per_epoch = self.steps_per_epoch(batch_size)
        epoch, skip = divmod(start_step, steps_per_epoch)
        while True:
            shuffle_seed = int(np.random.default_rng([seed, epoch, process_index]).integers(2**31))
            read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
            ds = self._records(
                self.input_config.train_split,
                process_index,
                process_count,
                shuffle_files=True,
                read_config=read_config,
            )
            ds = ds.shuffle(self.input_config.shuffle_buffer, seed=shuffle_seed)
            ds = ds.skip(skip * local).take((steps_per_epoch - skip) * local)

            def train_map(ex, i, shuffle_seed=shuffle_seed):
                # i: the example's position in this host's epoch (also after a resume).
                key = tf.random.experimental.stateless_split(
                    tf.stack([tf.cast(shuffle_seed, tf.int64), i]), 2
                )
                image = _decode_and_random_crop(ex["image"], self.size, key[1])
                image = tf.image.stateless_random_flip_left_right(image, key[0])
                return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

            ds = ds.enumerate(start=skip * local)
            ds = ds.map(lambda i, ex: train_map(ex, i), tf.data.AUTOTUNE)
            ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from tfds.as_numpy(ds)
            epoch, skip = epoch + 1, 0

    def eval_batches(
        self, split: str, batch_size: int, process_index=0, process_count=1
    ) -> Iterator[dict[str, np.ndarray]]:
        if split == "val":
            return
        local = batch_size // process_count
        per_host = math.ceil(self.info.num_test / process_count)
        num_batches = math.ceil(per_host / local)  # the same on every host
        ds = self._records(self.input_config.test_split, process_index, process_count)
        ds = ds.map(
            lambda ex: {
                "image": _decode_and_center_crop(ex["image"], self.size),
                "label": tf.cast(ex["label"], tf.int32),
            },
            tf.data.AUTOTUNE,
        )
        it = iter(tfds.as_numpy(ds.batch(local)))
        for _ in range(num_batches):
            batch = next(it, None)
            n = 0 if batch is None else len(batch["label"])
            image = np.zeros((local, *self.info.image_shape), np.float32)
            label = np.zeros((local,), np.int32)
            if n:
                image[:n], label[:n] = batch["image"], batch["label"]
            yield {"image": image, "label": label, "mask": np.arange(local) < n}
