"""Writes a tfds image dataset as one ``.npz`` (see :mod:`sdjax.data.npz`); needs tfds.

    python -m sdjax.data.npz_export --dataset=cifar10 --data_dir=../shared/data/tfds \\
        --out=cifar10.npz

Options: ``--train_size`` / ``--test_size`` keep only the first N examples of each split (in
the stored order; 0 = all), for a small file to test with; ``--no_compress`` stores the arrays
uncompressed. CIFAR-10 in full is 184 MB of uint8 pixels; compressed (zlib) about 171 MB, as
its pixels compress poorly. The output's size, shapes and SHA-256 are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os

from sdjax.data import npz, sources

__all__ = ["export", "main"]


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


def export(
    dataset: str,
    out: str,
    *,
    data_dir: str | None = None,
    use_extra: bool = False,
    train_size: int = 0,
    test_size: int = 0,
    compress: bool = True,
) -> dict:
    """Reads ``dataset`` from its tfds folder and writes ``out``; returns a summary dict."""
    if dataset not in sources.DATASETS or sources.DATASETS[dataset].tfds_name is None:
        names = [k for k, v in sources.DATASETS.items() if v.tfds_name and not v.streamed]
        raise ValueError(f"--dataset={dataset!r} is invalid; allowed: one of {names}.")
    input_config = _Input(dataset, data_dir, use_extra)
    info = sources.check_available(input_config)
    train, test = sources.load_arrays(input_config)
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
    parser.add_argument("--no_compress", action="store_true")
    args = parser.parse_args(argv)
    summary = export(
        args.dataset,
        args.out,
        data_dir=args.data_dir,
        use_extra=args.use_extra,
        train_size=args.train_size,
        test_size=args.test_size,
        compress=not args.no_compress,
    )
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
