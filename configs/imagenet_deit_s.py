"""ImageNet, DeiT-S (ViT-S/16, 22,050,664 parameters) with drop path 0.1: the DeiT recipe.

Touvron et al. 2021, "Training data-efficient image transformers" (``facebookresearch/deit``,
``deit_small_patch16_224``): AdamW (betas 0.9/0.999, eps 1e-8) with lr ``5e-4 * batch / 512``
(1e-3 at batch 1024), weight decay 0.05 on weights but not on biases, LayerNorms, position
embedding or class token, 300 epochs, cosine schedule after 5 linear warm-up epochs, label
smoothing 0.1, drop path 0.1 (timm's ``linspace(0, 0.1, 12)`` per block, the attention and MLP
branches dropped independently per sample, kept samples scaled by ``1 / (1 - rate)``), random
resized (Inception) crops at 224 with flips, bf16 compute. DeiT-S reaches 79.8% top-1:

    TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets python -m sdjax.main \\
        --config=configs/imagenet_deit_s.py --workdir=gs://BUCKET/runs/deit_s
    python -m sdjax.main --config=configs/imagenet_deit_s.py:mode=row_subset,batch_size=512 \\
        --workdir=/tmp/deit_s_rs

Not implemented in sdjax (so this trains DeiT-S *without* them, and should land below 79.8%):
the data-side regularisation -- Mixup 0.8 and CutMix 1.0, RandAugment (rand-m9-mstd0.5-inc1),
random erasing 0.25 and repeated augmentation (3 repeats) -- the cosine schedule's floor
(``min_lr`` 1e-5; here it decays to 0), the warm-up's start (``warmup_lr`` 1e-6; here 0), and
DeiT's evaluation crop (resize 256, center crop 224, bicubic) where the pipeline differs.

AdamW is ``optim.optimizer="adamw"`` (``optax.adamw``: decoupled weight decay, masked to
kernels by ``weight_decay_on="kernels"``).
"""

from sdjax.config import apply_arg, default_config

BATCH_SIZE = 1024


def get_config(arg=None):
    config = default_config()
    config.model.name = "vit_s16"
    config.model.num_classes = 1000
    config.model.final_drop_rate = 0.1
    config.model.drop_schedule = "linear"  # timm: linspace(0, 0.1, 12) over the blocks
    config.model.drop_mode = "row"
    config.model.scale_by_keep = True
    config.input.dataset = "imagenet2012"
    config.input.test_split = "validation"
    config.input.image_size = 224
    config.input.augment.crop_padding = 0
    config.input.augment.flip = False  # random resized crops and flips happen in tf.data
    config.optim.optimizer = "adamw"
    config.optim.learning_rate = 5e-4 * BATCH_SIZE / 512
    config.optim.momentum = 0.0
    config.optim.nesterov = False
    config.optim.weight_decay = 0.05
    # Kernels only: not biases, LayerNorm scales, pos_embed or cls_token (timm's no-decay set).
    config.optim.weight_decay_on = "kernels"
    config.optim.lr_schedule = "cosine"
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_type = "linear"
    config.optim.label_smoothing = 0.1
    config.train.batch_size = BATCH_SIZE
    config.train.eval_batch_size = 1000
    config.train.num_epochs = 300
    config.train.half_precision = True
    config.train.checkpoint_every_steps = 2000
    config.train.log_every_steps = 100
    return apply_arg(config, arg)
