"""A dataset as one ``.npz`` file, read with NumPy alone (no TensorFlow, no tfds).

For a host that has JAX but no TensorFlow: ``python -m sdjax.data.npz_export`` writes the file
from the tfds folder on a machine that has tfds, and ``config.input.npz_path`` points a run at
it. The file holds

* ``train_images`` ``uint8 [N, H, W, C]``, ``train_labels`` ``int32 [N]`` (the tfds ``train``
  split in its stored order, plus ``extra`` for SVHN with ``use_extra``);
* ``test_images`` / ``test_labels`` (the ``test`` split);
* ``dataset`` (the ``config.input.dataset`` name), ``num_classes`` and ``use_extra``, checked
  against the config when a run starts.

:func:`check_available` reads only the arrays' headers (no decompression), so the checks before
compiling stay cheap; :func:`load_arrays` loads the arrays.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from sdjax.data import sources

__all__ = ["KEYS", "check_available", "load_arrays", "read_shapes", "write"]

KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every array in the ``.npz`` at ``path``, from the headers alone."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            shapes[member[: -len(".npy")]] = tuple(shape)
    return shapes


def _metadata(path: str) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as f:
        return {
            "dataset": str(f["dataset"]) if "dataset" in f else None,
            "num_classes": int(f["num_classes"]) if "num_classes" in f else None,
            "use_extra": bool(f["use_extra"]) if "use_extra" in f else False,
        }


def check_available(input_config: Any, num_classes: int | None) -> sources.DatasetInfo:
    """Checks ``input_config.npz_path`` against the config and returns the dataset's info.

    Args:
      input_config: ``config.input`` with ``npz_path`` set.
      num_classes: the dataset's number of classes (None: the file's, e.g. synthetic data).

    Raises:
      ValueError: a missing or unreadable file, one without the four arrays, one written for
        another dataset or ``use_extra``, or split strings other than ``train`` / ``test``.
    """
    path = input_config.npz_path
    if not os.path.isfile(path):
        raise ValueError(
            f"config.input.npz_path={path!r} is not a file; write it with `python -m "
            f"sdjax.data.npz_export --dataset={input_config.dataset} --out={path}` on a machine "
            "with tensorflow-datasets and the tfds folder."
        )
    for field, split in (("train_split", "train"), ("test_split", "test")):
        if input_config[field] != split:
            raise ValueError(
                f"config.input.{field}={input_config[field]!r} is invalid with "
                f"config.input.npz_path; allowed: {split!r} (the file holds whole splits)."
            )
    try:
        shapes = read_shapes(path)
        meta = _metadata(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"config.input.npz_path={path!r} is not a readable .npz: {e}") from None
    missing = [k for k in KEYS if k not in shapes]
    if missing:
        raise ValueError(
            f"config.input.npz_path={path!r} lacks the arrays {missing}; it needs {list(KEYS)}."
        )
    if meta["dataset"] is not None and meta["dataset"] != input_config.dataset:
        raise ValueError(
            f"config.input.npz_path={path!r} holds {meta['dataset']!r}, not "
            f"config.input.dataset={input_config.dataset!r}."
        )
    if meta["use_extra"] != bool(input_config.get("use_extra", False)):
        raise ValueError(
            f"config.input.use_extra={input_config.get('use_extra')!r} does not match "
            f"config.input.npz_path={path!r}, written with use_extra={meta['use_extra']}."
        )
    classes = num_classes if num_classes is not None else meta["num_classes"]
    return sources.DatasetInfo(
        input_config.dataset,
        int(classes),
        tuple(shapes["train_images"][1:]),
        shapes["train_labels"][0],
        shapes["test_labels"][0],
    )


def load_arrays(path: str):
    """``((train_images, train_labels), (test_images, test_labels))`` from the ``.npz``.

    Images keep the file's dtype (``uint8`` for an export); labels are ``int32``.
    """
    with np.load(path, allow_pickle=False) as f:
        train = (f["train_images"], f["train_labels"].astype(np.int32))
        test = (f["test_images"], f["test_labels"].astype(np.int32))
    return train, test


def write(
    path: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    dataset: str,
    num_classes: int,
    use_extra: bool = False,
    compress: bool = True,
) -> None:
    """Writes the arrays and their metadata to ``path`` (``np.savez_compressed`` or ``savez``).

    The file is written next to ``path`` and renamed into place, so a reader never sees half a
    file.
    """
    tmp = path + ".tmp.npz"
    save = np.savez_compressed if compress else np.savez
    save(
        tmp,
        train_images=train[0],
        train_labels=np.asarray(train[1], np.int32),
        test_images=test[0],
        test_labels=np.asarray(test[1], np.int32),
        dataset=np.asarray(dataset),
        num_classes=np.asarray(num_classes, np.int32),
        use_extra=np.asarray(use_extra),
    )
    os.replace(tmp, path)
