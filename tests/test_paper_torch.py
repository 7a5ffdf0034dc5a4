"""The PyTorch port of the paper's Torch code (``experiments/reference/paper_torch.py``).

Expected values are written out from the Lua code (literals and index arithmetic), not taken
from the port.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def port(torch):
    from experiments.reference import paper_torch  # noqa: PLC0415

    return paper_torch


def test_learning_rate_drops_by_one_based_epoch_as_main_lua(port):
    drops = (0.5, 0.75)
    got = [port.learning_rate(e, 500, drops) for e in (1, 249, 250, 374, 375, 500)]
    assert got == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [port.learning_rate(e, 2, drops) for e in (1, 2)] == [0.01, 0.001]


def test_death_rates_grow_linearly_to_the_last_block(port):
    model = port.PaperResNet(20, 10, 0.5, "lin_decay")
    assert [b.death_rate for b in model.blocks] == [0.5 * i / 9 for i in range(1, 10)]
    uniform = port.PaperResNet(20, 10, 0.5, "uniform")
    assert {b.death_rate for b in uniform.blocks} == {0.5}


def test_parameter_count_is_the_published_one_plus_conv_biases(port):
    model = port.PaperResNet(110, 10, 0.5, "lin_decay")
    count = sum(p.numel() for p in model.parameters())
    biases = 16 + 18 * 2 * (16 + 32 + 64)  # stem, then two convolutions per block
    assert count - biases == 1_727_962


def test_translation_fills_zeros_and_moves_pixels_as_the_lua_indices(port, torch):
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) + 1
    seen = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.randint(-4, 5, (2, 2), generator=generator)
        flips = torch.randint(1, 3, (2,), generator=generator) == 1
        out = port.translate_and_flip(images, torch.Generator().manual_seed(seed))
        for i in range(2):
            yoffs, xoffs = int(offsets[i, 0]), int(offsets[i, 1])
            seen.add((yoffs, xoffs))
            expected = torch.zeros(3, 32, 32)
            # cifar-dataset.lua l.70-78 with 1-based inclusive ranges, in 0-based slices.
            in_y = slice(max(1, 1 + yoffs) - 1, min(32, 32 + yoffs))
            data_y = slice(max(1, 1 - yoffs) - 1, min(32, 32 - yoffs))
            in_x = slice(max(1, 1 + xoffs) - 1, min(32, 32 + xoffs))
            data_x = slice(max(1, 1 - xoffs) - 1, min(32, 32 - xoffs))
            expected[:, in_y, in_x] = images[i][:, data_y, data_x]
            if flips[i]:
                expected = torch.flip(expected, dims=(2,))
            torch.testing.assert_close(out[i], expected, rtol=0, atol=0)
    assert len(seen) > 30  # many of the 81 offset pairs were exercised


def test_normalisation_is_mean_image_and_one_unbiased_std_of_the_raw_training_values(port):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 3, 4, 4)).astype(np.float32)
    test = rng.integers(0, 256, (2, 3, 4, 4)).astype(np.float32)
    flat = train.reshape(-1).astype(np.float64)
    std = np.sqrt(((flat - flat.mean()) ** 2).sum() / (flat.size - 1))
    mean_image = train.astype(np.float64).sum(axis=0) / 5
    got_train, got_test = port.normalise(train, test)
    np.testing.assert_allclose(got_train, (train - mean_image) / std, rtol=1e-6)
    np.testing.assert_allclose(got_test, (test - mean_image) / std, rtol=1e-6)


def test_a_closed_block_is_not_run_but_weight_decay_and_momentum_still_apply(port, torch):
    torch.manual_seed(0)
    model = port.PaperResNet(20, 10, 0.5, "lin_decay")
    block = model.blocks[4]
    for b in model.blocks:
        b.gate = b is not block
    weight_before = block.branch[0].weight.detach().clone()
    stats_before = block.branch[1].running_mean.clone()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, dampening=0, nesterov=True, weight_decay=1e-4
    )
    model.train()
    optimizer.zero_grad(set_to_none=False)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(block.branch[1].running_mean, stats_before, rtol=0, atol=0)
    # optim.sgd, first step: g = wd * w (zero loss gradient), buffer = g, w -= lr (g + 0.9 g).
    torch.testing.assert_close(block.branch[0].weight.detach(), weight_before * (1 - 0.1 * 1.9e-4))
    model.eval()
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        shortcut, branch = model.blocks[0].shortcut(x), model.blocks[0].branch(x)
        expected = torch.relu(shortcut + branch * (1 - 0.5 / 9))
        torch.testing.assert_close(model.blocks[0](x), expected)


def test_a_tiny_run_on_a_pre_split_npz_keeps_its_split_and_evaluates_every_n_epochs(port, tmp_path):
    from sdjax.data import npz, npz_export  # noqa: PLC0415

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (90, 32, 32, 3), np.uint8), rng.integers(0, 10, 90))
    test = (rng.integers(0, 256, (20, 32, 32, 3), np.uint8), rng.integers(0, 10, 20))
    split = (30, 0, 40)
    whole, path = str(tmp_path / "whole.npz"), str(tmp_path / "subset.npz")
    npz.write(whole, train, test, dataset="cifar10", num_classes=10)
    assert port.load_npz(whole)[1] is None  # not pre-split: the port splits it itself
    subset = npz_export.split_arrays(train, split)
    npz.write(path, subset, test, dataset="cifar10", num_classes=10, split=split)
    (train_x, train_y, test_x, _), file_split = port.load_npz(path)
    assert file_split == split and train_x.shape == (70, 3, 32, 32)
    np.testing.assert_array_equal(test_x[3], test[0][3].transpose(2, 0, 1))
    args = ["--variant", "sd", "--seed", "1", "--depth", "8", "--epochs", "3"]
    args += ["--batch_size", "16", "--eval_every", "2", "--npz", path, "--out", str(tmp_path)]
    result = port.main(args)
    assert (result["train_size"], result["valid_size"]) == (40, 30)
    evaluated = [r["epoch"] for r in result["per_epoch"] if "valid_error" in r]
    assert evaluated == [2, 3]  # every 2 epochs and the last
    best = min(
        (r for r in result["per_epoch"] if "valid_error" in r), key=lambda r: r["valid_error"]
    )
    assert result["test_error_at_best_valid"] == best["test_error"]
    assert result["test_error"] == result["per_epoch"][-1]["test_error"]
    assert (tmp_path / "sd_seed1.json").exists()
    with pytest.raises(ValueError, match="--train_size=10: the pre-split --npz holds 40"):
        port.main([*args[:-2], "--out", str(tmp_path / "again"), "--train_size", "10"])
