"""CIFAR-10, ResNet-110 with stochastic depth (Huang et al. 2016, Table 1 / Figure 3).

Linear decay of the drop rate to 0.5 at the last block, batch-mode gates, 500 epochs of SGD
(lr 0.1, Nesterov momentum 0.9, weight decay 1e-4, /10 at 50% and 75%), batch 128, pad-4 crop +
flip. The paper reaches 5.25% test error (constant depth: 6.41%).

    TFDS_DATA_DIR=../shared/data/tfds python -m sdjax.main --config=configs/cifar10_sd.py \\
        --workdir=/tmp/c10_sd
    # a short run (arguments: final_drop_rate, mode, schedule, steps, epochs, seed, ...):
    python -m sdjax.main --config=configs/cifar10_sd.py:steps=50,final_drop_rate=0.3 \\
        --config.input.data_dir=../shared/data/tfds --workdir=/tmp/c10_short

Add ``validation_size=5000`` for the paper's 45k/5k split (test error at the best validation
epoch is then reported in results.json).
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.seed = 0
    config.model.name = "cifar_resnet110"
    config.model.num_classes = 10
    config.model.final_drop_rate = 0.5
    config.model.drop_schedule = "linear"
    config.model.drop_mode = "batch"
    config.model.scale_by_keep = False
    config.input.dataset = "cifar10"
    config.input.validation_size = 0
    config.input.augment.crop_padding = 4
    config.input.augment.flip = True
    config.optim.optimizer = "sgd"
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 1e-4
    config.optim.lr_schedule = "step"
    config.optim.boundaries = (0.5, 0.75)
    config.optim.decay_factor = 0.1
    config.train.batch_size = 128
    config.train.num_epochs = 500
    return apply_arg(config, arg)
