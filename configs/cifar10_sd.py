"""CIFAR-10, ResNet-110 with stochastic depth (Huang et al. 2016, Table 1 / Figure 3).

The paper's recipe, as its Torch code (``main.lua``, ``cifar-dataset.lua``, ``ResidualDrop.lua``)
runs it: the 50k training images shuffled (``split_seed``) into 45k train / 5k validation,
validation and test error every epoch, results.json with the test error at the best validation
epoch (``test_error_at_best_val``) and at the last epoch (``test_error``); a mean image and one
global std from the 45k; pad-4 translation (zeros after normalisation) + flip; linear decay of
the drop rate to 0.5 at the last block, batch-mode gates, eval-time scaling; 500 epochs of SGD
(Nesterov momentum 0.9, weight decay 1e-4 on every parameter), batch 128 with the last partial
batch kept, lr 0.1 / 0.01 / 0.001 by epoch (drops at epochs 250 and 375); stride-2 convs padded
1/1, Kaiming fan-in convs, Torch's Linear init, BatchNorm scale uniform in [0, 1). The paper
reaches 5.25% test error (constant depth: 6.41%).

    TFDS_DATA_DIR=../shared/data/tfds python -m sdjax.main --config=configs/cifar10_sd.py \\
        --workdir=/tmp/c10_sd
    # a short run (arguments: final_drop_rate, mode, schedule, steps, epochs, seed, ...):
    python -m sdjax.main --config=configs/cifar10_sd.py:steps=50,final_drop_rate=0.3 \\
        --config.input.data_dir=../shared/data/tfds --workdir=/tmp/c10_short
    # sdjax's earlier recipe (50k train, per-channel statistics, drops by step, ...):
    python -m sdjax.main --config=configs/cifar10_sd.py:recipe=sdjax --workdir=/tmp/c10_sdjax
    # without TensorFlow: a .npz export (python -m sdjax.data.npz_export), see
    # experiments/fullscale/README.md
    python -m sdjax.main --config=configs/cifar10_sd.py:npz_path=cifar10.npz --workdir=/tmp/c10
"""

from sdjax.config import apply_arg, apply_recipe, default_config


def get_config(arg=None):
    config = default_config()  # the paper's model, data, optimizer and schedule
    apply_recipe(config, "paper")  # validation 5k, statistics, batches, lr by epoch, init
    return apply_arg(config, arg)
