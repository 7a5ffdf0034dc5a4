"""ImageNet, ResNet-152 with stochastic depth (the paper: linear to 0.5, 90 epochs).

SGD lr 0.1 per 256 images (scaled linearly with the batch), momentum 0.9, weight decay 1e-4,
/10 at epochs 30 and 60, Inception crops at 224, bf16 compute. The paper reports 21.78%/5.95%
top-1/top-5 error with stochastic depth vs 21.98% without, on 1.28M images in TFRecords:

    TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets python -m sdjax.main \\
        --config=configs/imagenet_resnet152_sd.py --workdir=gs://BUCKET/runs/r152_sd
"""

from sdjax.config import apply_arg, default_config


def get_config(arg=None):
    config = default_config()
    config.model.name = "resnet152"
    config.model.num_classes = 1000
    config.input.dataset = "imagenet2012"
    config.input.test_split = "validation"
    config.input.image_size = 224
    config.input.augment.crop_padding = 0
    config.input.augment.flip = False  # flips happen in the tf.data pipeline
    config.optim.learning_rate = 0.1 * 1024 / 256
    config.optim.weight_decay_on = "kernels"
    config.optim.boundaries = (1 / 3, 2 / 3)
    config.optim.warmup_epochs = 5.0
    config.train.batch_size = 1024
    config.train.eval_batch_size = 1024
    config.train.num_epochs = 90
    config.train.half_precision = True
    config.train.checkpoint_every_steps = 2000
    config.train.log_every_steps = 100
    return apply_arg(config, arg)
