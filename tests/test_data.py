"""Tests of sdjax.data: data order purity, splits, augmentation, tfds loading and errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdjax import data as data_lib
from sdjax.config import default_config
from sdjax.data import augment


def _input(**overrides) -> ml_collections.ConfigDict:
    cfg = default_config().input
    cfg.dataset = "digits"
    cfg.augment.crop_padding = 1
    cfg.augment.flip = False
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_epoch_permutation_is_pure_function_of_seed_and_epoch():
    a = data_lib.epoch_permutation(3, 7, 100)
    np.testing.assert_array_equal(a, data_lib.epoch_permutation(3, 7, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, data_lib.epoch_permutation(3, 8, 100))
    assert not np.array_equal(a, data_lib.epoch_permutation(4, 7, 100))


def test_batch_indices_follow_the_epoch_permutation():
    """Epoch e's order is NumPy's ``default_rng([seed, e]).permutation`` (what the PyTorch
    reference draws too); step s reads batch s mod 10 of epoch s // 10."""
    n, bs = 103, 10  # 10 steps per epoch, 3 examples unused per epoch
    np.testing.assert_array_equal(
        data_lib.epoch_permutation(0, 2, n), np.random.default_rng([0, 2]).permutation(n)
    )
    for step in (0, 9, 10, 25):
        epoch, i = divmod(step, 10)
        expected = np.random.default_rng([0, epoch]).permutation(n)[i * bs : (i + 1) * bs]
        np.testing.assert_array_equal(data_lib.batch_indices(0, step, bs, n), expected)
    epoch0 = np.concatenate([data_lib.batch_indices(0, s, bs, n) for s in range(10)])
    assert len(set(epoch0.tolist())) == 100  # no repeats within an epoch


def test_digits_split_is_fixed_stratified_and_hosts_read_their_slices():
    ds = data_lib.create(_input())
    assert ds.train[0].shape == (1437, 8, 8, 1) and ds.train[0].dtype == np.float32
    assert ds.test[0].shape == (360, 8, 8, 1)
    assert len(ds.val[1]) == 0
    assert np.bincount(ds.test[1]).min() >= 35  # stratified: ~36 per class
    again = data_lib.create(_input())
    np.testing.assert_array_equal(ds.test[1], again.test[1])
    full = ds.train_batch(5, 30, 64)
    halves = [ds.train_batch(5, 30, 64, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), full["image"])
    it = ds.train_iterator(5, 30, 64)
    np.testing.assert_array_equal(next(it)["label"], full["label"])
    np.testing.assert_array_equal(next(it)["label"], ds.train_batch(5, 31, 64)["label"])


def _rows(images, labels):
    """Each example as one byte string (image and label), sorted: a multiset to compare."""
    flat = np.concatenate([images.reshape(len(images), -1).view(np.uint8),
                           labels.astype(np.int64).reshape(-1, 1).view(np.uint8)], axis=1)  # fmt: skip
    return sorted(row.tobytes() for row in flat)


def test_validation_split_and_eval_batches_cover_every_example_once():
    """The validation part and the remaining training part partition the training split (as
    multisets of examples: no example in both, none lost); eval batches cover the test split."""
    ds = data_lib.create(_input(validation_size=100))
    assert len(ds.val[1]) == 100 and len(ds.train[1]) == 1337
    full = data_lib.create(_input())
    assert _rows(*full.train) == sorted(_rows(*ds.train) + _rows(*ds.val))
    batches = list(ds.eval_batches("test", 128))
    assert [len(b["label"]) for b in batches] == [128, 128, 128]
    assert sum(int(b["mask"].sum()) for b in batches) == 360
    seen = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(seen, ds.test[1])


def test_normalisation_statistics_come_from_the_training_part():
    """With a validation part held out, mean and std are those of the remaining training images
    (NumPy over ``ds.train``), not of the whole training split."""
    ds = data_lib.create(_input(validation_size=400))
    assert len(ds.train[1]) == 1037 and len(ds.val[1]) == 400
    pixels = ds.train[0].reshape(-1).astype(np.float64)
    np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-12)
    whole = np.concatenate([ds.train[0], ds.val[0]]).reshape(-1).astype(np.float64)
    assert abs(whole.mean() - pixels.mean()) > 1e-3 * pixels.mean()  # the test can tell them apart
    x = augment.normalize(jnp.asarray(ds.train[0]), ds.mean, ds.std)
    np.testing.assert_allclose(float(x.mean()), 0.0, atol=1e-4)
    np.testing.assert_allclose(float(x.std()), 1.0, atol=1e-3)


def _window_matches(out, images, padding):
    """``[(2 * padding + 1) ** 2, B]``: whether ``out[b]`` equals window ``(dy, dx)`` (row-major)
    of the zero-padded ``images[b]``."""
    _, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    side = 2 * padding + 1
    windows = np.stack(
        [padded[:, dy : dy + h, dx : dx + w] for dy in range(side) for dx in range(side)]
    )
    return np.all(np.isclose(windows, np.asarray(out)[None], rtol=1e-6, atol=0), axis=(2, 3, 4))


def _crop_offsets(out, images, padding):
    """``[B, 2]``: the ``(dy, dx)`` window of its zero-padded image that each output equals (an
    assertion error where an output is no window, or several)."""
    match = _window_matches(out, images, padding)
    assert np.all(match.sum(0) == 1), "an output is not exactly one window of the padded image"
    return np.stack(divmod(match.argmax(0), 2 * padding + 1), axis=1)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    """2,000 images of distinct pixels, padding 2: each output is one of the 25 windows of its
    zero-padded image, and the offsets are uniform over the 25 (chi-square), alike in both
    halves of the batch."""
    from scipy import stats

    n, padding = 2000, 2
    images = (np.arange(n * 5 * 6, dtype=np.float32).reshape(n, 5, 6, 1) + 1) / 1000
    out = augment.random_crop(jnp.asarray(images), jax.random.key(0), padding=padding)
    assert out.shape == images.shape
    offsets = _crop_offsets(out, images, padding)
    counts = np.bincount(offsets[:, 0] * 5 + offsets[:, 1], minlength=25)
    assert counts[2 * 5 + 2] < 2 * n / 25  # the uncropped image is one window among 25
    assert stats.chisquare(counts).pvalue > 1e-3
    halves = [np.bincount(o[:, 0] * 5 + o[:, 1], minlength=25) for o in np.split(offsets, 2)]
    assert stats.chi2_contingency(np.array(halves)).pvalue > 1e-3
    assert augment.random_crop(images, jax.random.key(0), padding=0) is images


def test_random_flip_flips_about_half_and_is_keyed():
    """40,000 images: each is either itself or its mirror, and the flipped fraction is within
    5 standard errors (0.0125) of 1/2."""
    n = 40_000
    images = jnp.arange(n * 2, dtype=jnp.float32).reshape(n, 1, 2, 1)  # two distinct columns
    out = np.asarray(augment.random_flip(images, jax.random.key(2)))
    flipped = np.all(out == np.asarray(images[:, :, ::-1]), axis=(1, 2, 3))
    kept = np.all(out == np.asarray(images), axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert abs(flipped.mean() - 0.5) < 5 * (0.25 / n) ** 0.5
    np.testing.assert_array_equal(out, augment.random_flip(images, jax.random.key(2)))
    assert not np.array_equal(out, augment.random_flip(images, jax.random.key(3)))


def test_preprocess_eval_only_normalises():
    images = jnp.full((2, 4, 4, 3), 10, jnp.uint8)
    out = augment.preprocess(images, None, mean=(5.0, 5.0, 5.0), std=(5.0, 5.0, 5.0), flip=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 1.0)


def test_preprocess_train_normalises_then_crops_and_flips():
    """Training: normalise (so the crop pads with the mean pixel, 0 after normalising), then a
    random window and a random mirror: 400 images see several offsets and both flips."""
    n = 400
    raw = np.arange(n * 4 * 4 * 3).reshape(n, 4, 4, 3) % 251  # distinct pixels in each image
    mean, std = (100.5, 120.5, 140.5), (50.0, 60.0, 70.0)  # no pixel normalises to 0
    out = augment.preprocess(
        jnp.asarray(raw, jnp.uint8), jax.random.key(0), mean=mean, std=std, crop_padding=1,
        flip=True,
    )  # fmt: skip
    assert out.shape == (n, 4, 4, 3) and out.dtype == jnp.float32
    normalised = ((raw - np.array(mean)) / np.array(std)).astype(np.float32)
    out = np.asarray(out)
    plain = _window_matches(out, normalised, 1).any(0)
    mirrored = _window_matches(out[:, :, ::-1], normalised, 1).any(0)
    assert np.all(plain ^ mirrored)  # every output is a window, or a window's mirror
    offsets = _crop_offsets(np.where(mirrored[:, None, None, None], out[:, :, ::-1], out),
                            normalised, 1)  # fmt: skip
    assert 0.4 < mirrored.mean() < 0.6
    assert len({tuple(o) for o in offsets}) == 9  # all 3 x 3 offsets occur
    assert np.mean(np.all(offsets == 1, axis=1)) < 0.25  # (1, 1) is the uncropped image


def test_synthetic_is_deterministic():
    cfg = _input(dataset="synthetic", synthetic_num_train=64, synthetic_num_test=32)
    a, b = data_lib.create(cfg), data_lib.create(cfg)
    assert a.train[0].shape == (64, 32, 32, 3) and a.train[0].dtype == np.uint8
    np.testing.assert_array_equal(a.train[0], b.train[0])


def test_missing_tfds_dataset_says_where_it_looked_and_how_to_provide(tmp_path):
    cfg = _input(dataset="cifar100", data_dir=str(tmp_path))
    with pytest.raises(ValueError) as e:
        data_lib.check_available(cfg)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tfds build" in msg and "TFDS_DATA_DIR" in msg
    assert "gs://" in msg


def test_cifar10_loads_from_a_tfds_folder(tfds_data_dir):
    """The real CIFAR-10 when present, else the fake one (see the pytest summary line)."""
    cfg = _input(
        dataset="cifar10",
        data_dir=str(tfds_data_dir),
        train_split="train[:200]",
        test_split="test[:100]",
    )
    info = data_lib.check_available(cfg)
    assert info.image_shape == (32, 32, 3) and info.num_classes == 10 and info.num_train == 200
    ds = data_lib.create(cfg)
    assert ds.train[0].shape == (200, 32, 32, 3) and ds.train[0].dtype == np.uint8
    assert ds.test[0].shape == (100, 32, 32, 3)
    assert set(np.unique(ds.test[1])) <= set(range(10))
    assert 60 < ds.mean[0] < 200  # uint8 pixel statistics


def test_imagenet_stream_is_deterministic_and_resumable(tmp_path):
    """A tiny fake imagenet2012 (tfds' writer), 32 examples, 4 steps of 8 per epoch: the same
    seed gives the same batches (crops included), each epoch holds every example once in its
    own order, and a stream started at step 5 (epoch 1) continues the stream started at 0."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    features = tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.features
    rng = np.random.default_rng(0)

    def examples(split, n):
        return [
            (f"{split}_{i}", {"file_name": f"{split}_{i}.JPEG", "label": i % 1000,
                              "image": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)})
            for i in range(n)
        ]  # fmt: skip

    tfds.dataset_builders.store_as_tfds_dataset(
        name="imagenet2012",
        version=str(tfds.builder_cls("imagenet2012").VERSION),
        features=features,
        split_datasets={"train": examples("train", 32), "validation": examples("validation", 8)},
        config=None,
        data_dir=str(tmp_path),
    )
    cfg = _input(dataset="imagenet2012", data_dir=str(tmp_path), image_size=16, shuffle_buffer=8)
    cfg.test_split = "validation"
    ds = data_lib.create(cfg)

    def batches(start, n):
        it = ds.train_iterator(3, start, 8)
        return [next(it) for _ in range(n)]

    first, again, resumed = batches(0, 8), batches(0, 8), batches(5, 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    epochs = [np.concatenate([b["label"] for b in first[e * 4 : (e + 1) * 4]]) for e in (0, 1)]
    for labels in epochs:
        assert sorted(labels.tolist()) == list(range(32))  # labels are the example ids
    assert not np.array_equal(epochs[0], epochs[1])  # epoch 1 is shuffled anew
    for a, b in zip(first[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert first[0]["image"].shape == (8, 16, 16, 3)
