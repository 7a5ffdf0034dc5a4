"""ImageNet, EfficientNet-B0..B7 with drop-connect (stochastic depth in row mode).

The reference recipe (Tan & Le 2019): RMSProp (decay 0.9, momentum 0.9, eps 1e-3), lr 0.016 per
256 images with 5 warm-up epochs and x0.97 every 2.4 epochs, weight decay 1e-5, EMA 0.9999, label
smoothing 0.1, drop-connect 0.2 (row mode, scaled by 1/keep), 350 epochs, bf16. The argument
picks the variant (and its resolution); other arguments are key=value pairs:

    python -m sdjax.main --config=configs/imagenet_efficientnet.py:b0 --workdir=/tmp/effnet_b0
    python -m sdjax.main --config=configs/imagenet_efficientnet.py:variant=b3,final_drop_rate=0.3 \\
        --workdir=/tmp/effnet_b3
"""

from sdjax.config import apply_arg, default_config, parse_arg

RESOLUTIONS = {
    "b0": 224,
    "b1": 240,
    "b2": 260,
    "b3": 300,
    "b4": 380,
    "b5": 456,
    "b6": 528,
    "b7": 600,
}


def get_config(arg=None):
    variant = "b0"
    if arg and "=" not in arg.split(",")[0]:  # "b3" or "b3,key=value"
        variant, _, arg = arg.partition(",")
    pairs = parse_arg(arg)
    variant = pairs.pop("variant", variant).strip()
    if variant not in RESOLUTIONS:
        raise ValueError(
            f"EfficientNet variant {variant!r} is invalid; allowed: {list(RESOLUTIONS)}."
        )
    config = default_config()
    config.model.name = f"efficientnet_{variant}"
    config.model.num_classes = 1000
    config.model.final_drop_rate = 0.2
    config.model.drop_schedule = "efficientnet"  # rate * b / L (reference)
    config.model.drop_mode = "row"
    config.model.scale_by_keep = True
    config.input.dataset = "imagenet2012"
    config.input.test_split = "validation"
    config.input.image_size = RESOLUTIONS[variant]
    config.input.augment.crop_padding = 0
    config.input.augment.flip = False  # flips happen in the tf.data pipeline
    config.optim.optimizer = "rmsprop"
    config.optim.learning_rate = 0.016 * 2048 / 256
    config.optim.nesterov = False
    config.optim.weight_decay = 1e-5
    config.optim.weight_decay_on = "kernels"
    config.optim.lr_schedule = "exponential"
    config.optim.decay_factor = 0.97
    config.optim.warmup_epochs = 5.0
    config.optim.ema_decay = 0.9999
    config.optim.label_smoothing = 0.1
    config.train.batch_size = 2048
    config.train.eval_batch_size = 1024
    config.train.num_epochs = 350
    config.train.half_precision = True
    config.train.checkpoint_every_steps = 2000
    config.train.log_every_steps = 100
    return apply_arg(config, ",".join(f"{k}={v}" for k, v in pairs.items()))
