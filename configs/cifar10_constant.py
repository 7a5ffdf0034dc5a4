"""CIFAR-10, ResNet-110 with constant depth (the paper's baseline: 6.41% test error).

``configs/cifar10_sd.py`` (the paper's recipe) with ``final_drop_rate=0``:

    TFDS_DATA_DIR=../shared/data/tfds python -m sdjax.main \\
        --config=configs/cifar10_constant.py --workdir=/tmp/c10_constant
    # sdjax's earlier recipe: --config=configs/cifar10_constant.py:recipe=sdjax
"""

import importlib.util
import pathlib

from sdjax.config import apply_arg


def _cifar10_sd():
    """`configs/cifar10_sd.py`, loaded by path (config files are not a package)."""
    path = pathlib.Path(__file__).with_name("cifar10_sd.py")
    spec = importlib.util.spec_from_file_location("cifar10_sd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    config = _cifar10_sd().get_config()
    config.model.final_drop_rate = 0.0
    return apply_arg(config, arg)
