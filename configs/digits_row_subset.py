"""scikit-learn digits, ResNet-32 with row-subset stochastic depth (the branch skips dropped samples).

`configs/digits_sd.py` with the per-sample row-subset mode instead of batch mode: each residual
block runs its branch on exactly ``k = max(1, round((1 - rate) * 64))`` random samples of the
batch of 64 (drop rate linear to 0.5 over the 15 blocks; a BatchNorm in the branch normalises over
those samples) and adds ``branch * 64 / k`` to their shortcut (``scale_by_keep=True``); the other
samples get the shortcut only. The scanned stages pad each block to the stage's largest ``k``.
Expected: test error within noise of masked row mode at the same rates (``mode=row``);
`experiments/row_subset_digits.py` compares the two over 5 seeds at 15 epochs, results in
`experiments/results/row_subset_digits/`.

    python -m sdjax.main --config=configs/digits_row_subset.py --workdir=/tmp/sdjax_digits_rs
    python -m sdjax.main --config=configs/digits_row_subset.py:mode=row \\
        --workdir=/tmp/sdjax_digits_row
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.seed = 0
    config.model.name = "cifar_resnet32"
    config.model.num_classes = 10
    config.model.input_channels = 1
    config.model.final_drop_rate = 0.5
    config.model.drop_schedule = "linear"
    config.model.drop_mode = "row_subset"
    config.model.scale_by_keep = True
    config.model.scan_blocks = True  # one compiled block per stage: fast compile on CPU
    config.input.dataset = "digits"
    config.input.digits_test_size = 360
    config.input.split_seed = 0
    config.input.validation_size = 0
    config.input.augment.crop_padding = 1
    config.input.augment.flip = False
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 1e-4
    config.optim.lr_schedule = "step"
    config.optim.warmup_epochs = 1.0  # linear warm-up: deep nets diverge at lr 0.1 from the start
    config.optim.warmup_type = "linear"
    config.optim.boundaries = (0.5, 0.75)
    config.train.batch_size = 64
    config.train.eval_batch_size = 360
    config.train.num_epochs = 20
    config.train.eval_every_epochs = 5
    config.train.checkpoint_every_steps = 200
    config.train.log_every_steps = 20
    return apply_arg(config, arg)
