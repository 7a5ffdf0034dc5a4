"""CIFAR-10, ResNet-110 with constant depth (the paper's baseline: 6.41% test error).

``configs/cifar10_sd.py`` (the paper's recipe) with ``final_drop_rate=0``:

    TFDS_DATA_DIR=../shared/data/tfds python -m sdjax.main \\
        --config=configs/cifar10_constant.py --workdir=/tmp/c10_constant
    # sdjax's earlier recipe: --config=configs/cifar10_constant.py:recipe=sdjax
"""

from sdjax.config import apply_arg, sibling_config


def get_config(arg=None):
    config = sibling_config(__file__, "cifar10_sd")
    config.model.final_drop_rate = 0.0
    return apply_arg(config, arg)
