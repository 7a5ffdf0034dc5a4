"""The tests' tiny run: digits with a narrow ResNet-20, 6 steps, checkpoints every 3 steps.

Loaded by the ``tiny_config`` fixture (``tests/conftest.py``) and, as a config file, by the
tests that run the command line in child processes::

    python -m sdjax.main --config=tests/tiny_config.py:steps=8 --workdir=/tmp/tiny
"""

import importlib.util
import pathlib

from sdjax.config import apply_arg

_DIGITS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits_sd.py"


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("digits_sd_for_tests", _DIGITS)
    digits_sd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits_sd)
    config = digits_sd.get_config()
    config.model.name = "cifar_resnet20"
    config.model.widths = (4, 4, 8)
    config.train.batch_size = 32
    config.train.eval_batch_size = 360
    config.train.num_train_steps = 6
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 3
    config.train.progress_bar = False
    # No TensorBoard events: writing them imports clu and TensorFlow (~3 s per child process).
    # The tests of the events turn them on (test_train.py, test_reliability.py).
    config.train.tensorboard = False
    return apply_arg(config, arg)
