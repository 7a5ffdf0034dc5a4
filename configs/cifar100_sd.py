"""CIFAR-100, ResNet-110 with stochastic depth (linear to 0.5, batch mode), 500 epochs.

The paper's recipe as for CIFAR-10 (``configs/cifar10_sd.py``; the paper's code uses the same
split, statistics, lr drops at 50% / 75% of the epochs and init for CIFAR-100). The paper reaches
24.98% test error (constant depth: 27.22%).

    python -m sdjax.main --config=configs/cifar100_sd.py --workdir=/tmp/c100_sd
    # sdjax's earlier recipe: --config=configs/cifar100_sd.py:recipe=sdjax
"""

from sdjax.config import apply_arg, apply_recipe, default_config


def get_config(arg=None):
    config = default_config()
    config.model.num_classes = 100
    config.input.dataset = "cifar100"
    apply_recipe(config, "paper")  # validation 5k, statistics, batches, lr by epoch, init
    return apply_arg(config, arg)
