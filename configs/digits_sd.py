"""scikit-learn digits (8x8x1, 1,437 train / 360 test), a deep CIFAR ResNet with stochastic depth.

The embedded default main job: no download, a few minutes on two CPU cores, >= 97% test accuracy.
ResNet-32 (15 residual blocks) on 8x8 images (stages at 8x8, 4x4, 2x2), drop rate linear to 0.5, batch mode
(a dropped block is skipped for the whole batch: forward and backward), pad-1 random crops (no
flips: digits are not mirror-symmetric), SGD with Nesterov momentum and the paper's step schedule.

    python -m sdjax.main --config=configs/digits_sd.py --workdir=/tmp/sdjax_digits
    python -m sdjax.main --config=configs/digits_sd.py:final_drop_rate=0,epochs=10 \\
        --workdir=/tmp/sdjax_digits_constant
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "cifar_resnet32"
    config.model.input_channels = 1
    config.model.scan_blocks = True  # one compiled block per stage: fast compile on CPU
    config.input.dataset = "digits"
    config.input.augment.crop_padding = 1
    config.input.augment.flip = False
    config.optim.warmup_epochs = 1.0  # linear warm-up: deep nets diverge at lr 0.1 from the start
    config.train.batch_size = 64
    config.train.eval_batch_size = 360
    config.train.num_epochs = 20
    config.train.eval_every_epochs = 5
    config.train.checkpoint_every_steps = 200
    config.train.log_every_steps = 20
    return apply_arg(config, arg)
