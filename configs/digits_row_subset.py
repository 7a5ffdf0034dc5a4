"""scikit-learn digits, ResNet-32 with row-subset stochastic depth (the branch skips dropped samples).

`configs/digits_sd.py` with the per-sample row-subset mode instead of batch mode: each residual
block runs its branch on exactly ``k = max(1, round((1 - rate) * 64))`` random samples of the
batch of 64 (drop rate linear to 0.5 over the 15 blocks; a BatchNorm in the branch normalises over
those samples) and adds ``branch * 64 / k`` to their shortcut (``scale_by_keep=True``); the other
samples get the shortcut only. The scanned stages pad each block to the stage's largest ``k``.
Expected: test error within noise of masked row mode at the same rates (``mode=row``);
`experiments/row_subset/run.py` compares the two over 5 seeds at 15 epochs, results in
`experiments/row_subset/results/digits/`.

    python -m sdjax.main --config=configs/digits_row_subset.py --workdir=/tmp/sdjax_digits_rs
    python -m sdjax.main --config=configs/digits_row_subset.py:mode=row \\
        --workdir=/tmp/sdjax_digits_row
"""

from sdjax.config import apply_arg, sibling_config


def get_config(arg=None):
    config = sibling_config(__file__, "digits_sd")
    config.model.drop_mode = "row_subset"
    config.model.scale_by_keep = True
    return apply_arg(config, arg)
