"""A dataset as one ``.npz`` file, read with NumPy alone (no TensorFlow, no tfds).

For a host that has JAX but no TensorFlow: ``python -m sdjax.data.npz_export`` writes the file
from the tfds folder on a machine that has tfds, and ``config.input.npz_path`` points a run at
it. The file holds

* ``train_images`` ``uint8 [N, H, W, C]``, ``train_labels`` ``int32 [N]`` (the tfds ``train``
  split in its stored order, plus ``extra`` for SVHN with ``use_extra``);
* ``test_images`` / ``test_labels`` (the ``test`` split);
* ``dataset`` (the ``config.input.dataset`` name), ``num_classes`` and ``use_extra``, checked
  against the config when a run starts;
* optionally ``split`` ``int [3]``: ``(validation_size, split_seed, train_size)``. Such a file
  (``npz_export --split``) holds only the examples that split keeps, already split: the
  ``train_size`` training examples, then the ``validation_size`` validation examples, each in
  stored order, exactly as :func:`sdjax.data.pipeline.create` splits the whole ``train``. A run
  on it must set the same three ``config.input`` fields, and then sees the same data as on
  the whole split (a file for a study of a subset, small enough to carry to another host).

:func:`check_available` reads only the arrays' headers (no decompression), so the checks before
compiling stay cheap; :func:`load_arrays` loads the arrays.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from sdjax.data import sources

__all__ = [
    "KEYS",
    "SPLIT_FIELDS",
    "check_available",
    "file_split",
    "load_arrays",
    "read_shapes",
    "write",
]

KEYS = ("train_images", "train_labels", "test_images", "test_labels")
SPLIT_FIELDS = ("validation_size", "split_seed", "train_size")
"""The ``config.input`` fields a pre-split file's ``split`` array holds, in order."""


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
            "split": tuple(int(v) for v in f["split"]) if "split" in f else None,
        }


def file_split(path: str) -> tuple[int, int, int] | None:
    """The file's ``(validation_size, split_seed, train_size)`` if it is pre-split, else None."""
    return _metadata(path)["split"]


def check_available(input_config: Any, num_classes: int | None) -> sources.DatasetInfo:
    """Checks ``input_config.npz_path`` against the config and returns the dataset's info.

    Args:
      input_config: ``config.input`` with ``npz_path`` set.
      num_classes: the dataset's number of classes (None: the file's, e.g. synthetic data).

    Raises:
      ValueError: a missing or unreadable file, one without the four arrays, one written for
        another dataset or ``use_extra``, split strings other than ``train`` / ``test``, or a
        pre-split file whose split differs from the config's.
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
    if meta["split"] is not None:
        validation_size, _, train_size = meta["split"]
        if train_size and shapes["train_labels"][0] != validation_size + train_size:
            raise ValueError(
                f"config.input.npz_path={path!r} holds {shapes['train_labels'][0]} training "
                f"examples, not the {validation_size} + {train_size} of its split."
            )
        pairs = list(zip(SPLIT_FIELDS, meta["split"], strict=True))
        written = ", ".join(f"{k}={v}" for k, v in pairs)
        for field, value in pairs:
            if int(input_config.get(field, 0)) != value:
                raise ValueError(
                    f"config.input.{field}={input_config.get(field, 0)!r} does not match "
                    f"config.input.npz_path={path!r}, which holds the split {written} only; "
                    "allowed: those values."
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
    split: tuple[int, int, int] | None = None,
) -> None:
    """Writes the arrays and their metadata to ``path`` (``np.savez_compressed`` or ``savez``).

    ``split``: ``(validation_size, split_seed, train_size)`` of a pre-split file (see the module
    docstring); ``train`` must then be the training examples followed by the validation ones.

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
        **({} if split is None else {"split": np.asarray(split, np.int64)}),
    )
    os.replace(tmp, path)
