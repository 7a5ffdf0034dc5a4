"""sdjax.config (schema, argument strings, field checks) and every config in configs/: each
loads, takes its argument strings and validates (no training)."""

import ast
import functools
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from sdjax import config as config_lib
from sdjax import optim, steps, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
EXPECTED = {
    "cifar10_sd",
    "cifar10_constant",
    "cifar100_sd",
    "svhn_sd",
    "cifar10_resnet1202_sd",
    "imagenet_resnet152_sd",
    "imagenet_efficientnet",
    "digits_sd",
    "digits_row_subset",
}


def load(name, arg=None):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_all_configs_are_present():
    assert {os.path.basename(p)[:-3] for p in CONFIGS} >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_validates_without_data(name):
    config = load(name)
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    assert docstring and "python -m sdjax.main" in docstring, "the docstring names the command"
    config_lib.validate_fields(config)
    trainer.create_model(config)  # the model checks its own fields
    assert set(config) == set(config_lib.default_config())


@pytest.mark.parametrize("name", ["cifar10_sd", "cifar10_constant"])
def test_cifar10_configs_validate_against_the_data(name, tfds_data_dir):
    """Real CIFAR-10 when present, else the fake one (see the pytest summary line)."""
    config = load(name, f"steps=10,data_dir={tfds_data_dir}")
    trainer.check(config, device_count=1)


def test_constant_depth_baseline_is_the_sd_recipe_without_drops():
    constant = load("cifar10_constant").to_dict()
    sd = load("cifar10_sd").to_dict()
    assert constant["model"].pop("final_drop_rate") == 0.0
    assert sd["model"].pop("final_drop_rate") == 0.5
    assert constant == sd


def test_state_shapes_of_the_paper_model_without_compiling():
    config = load("cifar10_sd")
    model = trainer.create_model(config)
    tx = optim.create(config.optim, 1000, 390)
    init = functools.partial(steps.create_train_state, config, model, (32, 32, 3), tx=tx)
    state = jax.eval_shape(init, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(state.params))
    assert 1.6e6 < n < 1.8e6  # ResNet-110: 1.7M parameters


def test_argument_strings():
    config = load("cifar10_sd", "final_drop_rate=0.3,mode=row,schedule=uniform,seed=3")
    assert (config.model.final_drop_rate, config.model.drop_mode) == (0.3, "row")
    assert (config.model.drop_schedule, config.seed) == ("uniform", 3)
    b3 = load("imagenet_efficientnet", "b3")
    assert b3.model.name == "efficientnet_b3" and b3.input.image_size == 300
    b5 = load("imagenet_efficientnet", "variant=b5,final_drop_rate=0.3")
    assert b5.model.name == "efficientnet_b5" and b5.model.final_drop_rate == 0.3
    with pytest.raises(ValueError, match="variant 'b9'"):
        load("imagenet_efficientnet", "b9")
    assert load("digits_sd", "epochs=3").train.num_epochs == 3


def test_arg_strings_aliases_dotted_paths_and_new_model_fields():
    config = config_lib.apply_arg(
        config_lib.default_config(),
        "final_drop_rate=0.3,mode=row,steps=7,train.progress_bar=0,model.scan_blocks=false,"
        "model.widths=4;4;8",
    )
    assert config.model.final_drop_rate == 0.3 and config.model.drop_mode == "row"
    assert config.train.num_train_steps == 7 and config.train.progress_bar is False
    assert config.model.scan_blocks is False and config.model.widths == (4, 4, 8)
    with pytest.raises(ValueError, match="unknown config argument 'final_rate'"):
        config_lib.apply_arg(config, "final_rate=0.3")
    with pytest.raises(ValueError, match="final_drop_rate='abc': expected a float"):
        config_lib.apply_arg(config, "final_drop_rate=abc")


def test_config_module_and_config_files_import_no_jax():
    code = (
        "import sys; import sdjax.config; sys.path.insert(0, 'configs'); "
        "import cifar10_sd, digits_sd, imagenet_efficientnet; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')], 'jax'"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
