"""CIFAR-100, ResNet-110 with stochastic depth (linear to 0.5, batch mode), 500 epochs.

The paper reaches 24.98% test error (constant depth: 27.22%).

    python -m sdjax.main --config=configs/cifar100_sd.py --workdir=/tmp/c100_sd
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet110"
    config.model.num_classes = 100
    config.model.final_drop_rate = 0.5
    config.model.drop_schedule = "linear"
    config.model.drop_mode = "batch"
    config.input.dataset = "cifar100"
    config.input.augment.crop_padding = 4
    config.input.augment.flip = True
    config.optim.learning_rate = 0.1
    config.optim.weight_decay = 1e-4
    config.optim.lr_schedule = "step"
    config.optim.boundaries = (0.5, 0.75)
    config.train.batch_size = 128
    config.train.num_epochs = 500
    return apply_arg(config, arg)
