"""CIFAR-10, 1202-layer ResNet with stochastic depth (the paper: 4.91% test error vs 7.93%).

Blocks are scanned (``scan_blocks``) and rematerialised to keep compile time and memory low. As
in He et al., the learning rate is 0.01 for the first 400 steps, then 0.1 (step decay at 50% and
75% of 500 epochs).

The paper's recipe otherwise as ``configs/cifar10_sd.py`` (45k/5k split, mean image and global
std, partial batch kept, lr by epoch, its init and padding); the warm-up is He et al.'s, not in
the paper's code.

    python -m sdjax.main --config=configs/cifar10_resnet1202_sd.py --workdir=/tmp/c10_1202
    # sdjax's earlier recipe: --config=configs/cifar10_resnet1202_sd.py:recipe=sdjax
"""

from sdjax.config import apply_arg, apply_recipe, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet1202"
    config.model.scan_blocks = True
    config.model.remat = True
    config.optim.warmup_steps = 400
    config.optim.warmup_type = "constant"
    apply_recipe(config, "paper")  # validation 5k, statistics, batches, lr by epoch, init
    return apply_arg(config, arg)
