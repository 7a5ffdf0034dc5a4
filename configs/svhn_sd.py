"""SVHN (train + extra, 604k images), 152-layer CIFAR-style ResNet with stochastic depth.

The paper: linear decay to 0.5, 50 epochs, lr 0.1 divided by 10 after 30 and 35 epochs, no
augmentation (no flips for digits), 1.75% test error (constant depth: 1.80%). Depth 152 = 6*25 + 2.

    python -m sdjax.main --config=configs/svhn_sd.py --workdir=/tmp/svhn_sd
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet152"
    config.model.num_classes = 10
    config.model.final_drop_rate = 0.5
    config.model.drop_schedule = "linear"
    config.model.drop_mode = "batch"
    config.input.dataset = "svhn_cropped"
    config.input.use_extra = True
    config.input.augment.crop_padding = 0
    config.input.augment.flip = False
    config.optim.learning_rate = 0.1
    config.optim.weight_decay = 1e-4
    config.optim.lr_schedule = "step"
    config.optim.boundaries = (0.6, 0.7)  # epochs 30 and 35 of 50
    config.train.batch_size = 128
    config.train.num_epochs = 50
    config.train.checkpoint_every_steps = 2000
    return apply_arg(config, arg)
