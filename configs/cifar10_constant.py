"""CIFAR-10, ResNet-110 with constant depth (the paper's baseline: 6.41% test error).

Same as ``cifar10_sd.py`` with ``final_drop_rate=0``:

    TFDS_DATA_DIR=../shared/data/tfds python -m sdjax.main \\
        --config=configs/cifar10_constant.py --workdir=/tmp/c10_constant
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet110"
    config.model.num_classes = 10
    config.model.final_drop_rate = 0.0
    config.input.dataset = "cifar10"
    config.input.augment.crop_padding = 4
    config.input.augment.flip = True
    config.optim.learning_rate = 0.1
    config.optim.weight_decay = 1e-4
    config.optim.lr_schedule = "step"
    config.optim.boundaries = (0.5, 0.75)
    config.train.batch_size = 128
    config.train.num_epochs = 500
    return apply_arg(config, arg)
