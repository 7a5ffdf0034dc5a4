"""SVHN (train + extra, 604k images), 152-layer CIFAR-style ResNet with stochastic depth.

The paper: linear decay to 0.5, 50 epochs, lr 0.1 / 0.01 / 0.001 by epoch with drops at 60% and
70% of the epochs (``lrSchedule.svhn = {0.6, 0.7}`` in ``main.lua``: epochs 30 and 35), no
augmentation, 1.75% test error (constant depth: 1.80%). Depth 152 = 6*25 + 2. The paper's
recipe otherwise as ``configs/cifar10_sd.py``: 6,000 images held out for validation (the paper's
code takes 400 per class from train and 200 per class from extra; here a seeded random 6,000 of
the 604k), a mean image and one global std, the last partial batch kept, its init and padding.
The paper's code evaluates every 200 iterations; here every epoch.

    python -m sdjax.main --config=configs/svhn_sd.py --workdir=/tmp/svhn_sd
    # sdjax's earlier recipe: --config=configs/svhn_sd.py:recipe=sdjax
"""

from sdjax.config import apply_arg, apply_recipe, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet152"
    config.input.dataset = "svhn_cropped"
    config.input.use_extra = True
    config.input.augment.crop_padding = 0
    config.input.augment.flip = False
    config.optim.boundaries = (0.6, 0.7)  # epochs 30 and 35 of 50
    config.train.num_epochs = 50
    config.train.checkpoint_every_steps = 2000
    apply_recipe(config, "paper")  # validation 6k, statistics, batches, lr by epoch, init
    return apply_arg(config, arg)
