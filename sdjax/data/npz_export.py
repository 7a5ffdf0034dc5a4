"""Writes a tfds image dataset as one ``.npz`` (see :mod:`sdjax.data.npz`); needs tfds.

    python -m sdjax.data.npz_export --dataset=cifar10 --data_dir=../shared/data/tfds \\
        --out=cifar10.npz

Options: ``--train_size`` / ``--test_size`` keep only the first N examples of each split (in
the stored order; 0 = all), for a small file to test with; ``--split=V,SEED,N`` writes only the
examples that ``config.input.validation_size=V, split_seed=SEED, train_size=N`` train and
validate on, already split (a pre-split file, see :mod:`sdjax.data.npz`: a run on it sees the
same data as on the whole split; CIFAR-10's 1,024 + 5,000 + the 10,000 test images are about
45 MB); ``--no_compress`` stores the arrays uncompressed. CIFAR-10 in full is 184 MB of uint8
pixels; compressed (zlib) about 171 MB, as its pixels compress poorly. The output's size,
shapes and SHA-256 are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os

import numpy as np

from sdjax.data import npz, pipeline, sources

__all__ = ["export", "main", "split_arrays"]


@dataclasses.dataclass
class _Input:
    """The ``config.input`` fields :mod:`sdjax.data.sources` reads (ml_collections not needed)."""

    dataset: str
    data_dir: str | None
    use_extra: bool
    train_split: str = "train"
    test_split: str = "test"

    def get(self, key, default=None):
        return getattr(self, key, default)


def split_arrays(train, split: tuple[int, int, int]):
    """``(images, labels)`` of a pre-split file: the examples that ``split`` (``validation_size,
    split_seed, train_size``) trains on, then those it validates on, as the pipeline splits."""
    part, val = pipeline.split_validation(train, *split)
    return tuple(np.concatenate([a, b]) for a, b in zip(part, val, strict=True))


def export(
    dataset: str,
    out: str,
    *,
    data_dir: str | None = None,
    use_extra: bool = False,
    train_size: int = 0,
    test_size: int = 0,
    compress: bool = True,
    split: tuple[int, int, int] | None = None,
) -> dict:
    """Reads ``dataset`` from its tfds folder and writes ``out``; returns a summary dict.

    ``split``: ``(validation_size, split_seed, train_size)``: write the pre-split file of that
    split (not with ``train_size``).
    """
    if dataset not in sources.DATASETS or sources.DATASETS[dataset].tfds_name is None:
        names = [k for k, v in sources.DATASETS.items() if v.tfds_name and not v.streamed]
        raise ValueError(f"--dataset={dataset!r} is invalid; allowed: one of {names}.")
    if split is not None and train_size:
        raise ValueError(f"--train_size={train_size} is invalid with --split; allowed: 0.")
    input_config = _Input(dataset, data_dir, use_extra)
    info = sources.check_available(input_config)
    train, test = sources.load_arrays(input_config)
    if split is not None:
        train = split_arrays(train, split)
    if train_size:
        train = (train[0][:train_size], train[1][:train_size])
    if test_size:
        test = (test[0][:test_size], test[1][:test_size])
    npz.write(
        out,
        train,
        test,
        dataset=dataset,
        num_classes=info.num_classes,
        use_extra=use_extra,
        compress=compress,
        split=split,
    )
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "out": out,
        "bytes": os.path.getsize(out),
        "train_images": tuple(train[0].shape),
        "test_images": tuple(test[0].shape),
        "sha256": digest.hexdigest(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data_dir", default=None, help="tfds folder (else $TFDS_DATA_DIR)")
    parser.add_argument("--use_extra", action="store_true", help="SVHN: add the extra split")
    parser.add_argument("--train_size", type=int, default=0)
    parser.add_argument("--test_size", type=int, default=0)
    parser.add_argument(
        "--split",
        default=None,
        help="V,SEED,N: only the examples of validation_size V, split_seed SEED, train_size N",
    )
    parser.add_argument("--no_compress", action="store_true")
    args = parser.parse_args(argv)
    split = None
    if args.split is not None:
        try:
            split = tuple(int(v) for v in args.split.split(","))
        except ValueError:
            split = ()
        if len(split) != 3 or split[0] < 0 or split[2] < 0:
            parser.error(
                f"--split={args.split!r} is invalid; allowed: V,SEED,N "
                "(validation_size, split_seed, train_size; integers, V and N >= 0)"
            )
        if args.train_size:
            parser.error(f"--train_size={args.train_size} is invalid with --split; allowed: 0")
    summary = export(
        args.dataset,
        args.out,
        data_dir=args.data_dir,
        use_extra=args.use_extra,
        train_size=args.train_size,
        test_size=args.test_size,
        compress=not args.no_compress,
        split=split,
    )
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
