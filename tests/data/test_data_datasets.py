"""Real MNIST / Fashion-MNIST files, the digits set, names and the data-dir rules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from retain.data import datasets
from retain.data.datasets import DATASET_NAMES, TensorSplits, load_dataset, resolve_data_dir


@pytest.fixture(scope="module")
def mnist(shared_data_dir: Path) -> TensorSplits:
    return load_dataset("mnist", shared_data_dir, download=False)


def test_mnist_shapes_and_labels(mnist: TensorSplits) -> None:
    assert mnist.name == "mnist"
    assert mnist.train_inputs.shape == (60000, 1, 28, 28) and mnist.train_inputs.dtype == torch.uint8
    assert mnist.test_inputs.shape == (10000, 1, 28, 28) and mnist.test_inputs.dtype == torch.uint8
    assert mnist.train_targets.dtype == mnist.test_targets.dtype == torch.int64
    assert mnist.test_targets.shape == (10000,)
    assert int(mnist.train_targets.min()) == 0 and int(mnist.train_targets.max()) == 9
    assert int(mnist.test_targets.min()) >= 0 and int(mnist.test_targets.max()) <= 9
    assert mnist.train_targets[:5].tolist() == [5, 0, 4, 1, 9]
    counts = torch.bincount(mnist.train_targets, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert int(mnist.train_inputs.max()) == 255
    assert (mnist.num_classes, mnist.input_shape, mnist.scale) == (10, (1, 28, 28), 255.0)


def test_mnist_normalisation_constants_match_data(mnist: TensorSplits) -> None:
    x = mnist.train_inputs.double() / mnist.scale
    assert x.mean().item() == pytest.approx(mnist.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(mnist.std[0], abs=1e-3)


def test_fashion_mnist_is_balanced(shared_data_dir: Path) -> None:
    fm = load_dataset("fashion-mnist", shared_data_dir, download=False)
    assert fm.train_inputs.shape == (60000, 1, 28, 28) and fm.train_inputs.dtype == torch.uint8
    assert torch.bincount(fm.train_targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fm.test_targets, minlength=10).tolist() == [1000] * 10
    x = fm.train_inputs.double() / 255
    assert x.mean().item() == pytest.approx(fm.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(fm.std[0], abs=1e-3)


def test_loading_speed(shared_data_dir: Path, mnist: TensorSplits) -> None:
    start = time.perf_counter()
    again = load_dataset("mnist", shared_data_dir, download=False)
    in_process = time.perf_counter() - start
    datasets._VERIFIED.clear()  # as a fresh process: only the on-disk records and the .npy cache
    start = time.perf_counter()
    load_dataset("mnist", shared_data_dir, download=False)
    fresh = time.perf_counter() - start
    print(f"\nMNIST load from cache: {in_process * 1000:.0f} ms in-process, {fresh * 1000:.0f} ms fresh")
    assert torch.equal(again.train_inputs, mnist.train_inputs)
    assert fresh < 5.0  # loose: shared CI machines are noisy; expected well under a second


def test_data_dir_from_environment(shared_data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("RETAIN_DATA_DIR", str(shared_data_dir))
    assert resolve_data_dir() == shared_data_dir
    assert resolve_data_dir("/somewhere/else") == Path("/somewhere/else")
    assert load_dataset("mnist", download=False).train_inputs.shape[0] == 60000


def test_default_data_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RETAIN_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir() == tmp_path / ".cache" / "retain" / "data"
    assert resolve_data_dir("~/x") == tmp_path / "x"


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="imagenet") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_digits() -> None:
    d = load_dataset("digits")
    assert d.train_inputs.shape == (1347, 1, 8, 8) and d.test_inputs.shape == (450, 1, 8, 8)
    assert d.train_inputs.dtype == torch.uint8 and d.train_targets.dtype == torch.int64
    assert int(d.train_inputs.max()) == 16 and int(d.train_inputs.min()) == 0
    assert (d.scale, d.num_classes, d.input_shape) == (16.0, 10, (1, 8, 8))
    test_counts = torch.bincount(d.test_targets, minlength=10)
    assert int(test_counts.min()) >= 43 and int(test_counts.max()) <= 46  # stratified 25 %
    again = load_dataset("digits")
    assert torch.equal(d.train_inputs, again.train_inputs) and torch.equal(d.test_targets, again.test_targets)
    x = d.train_inputs.double() / d.scale
    assert x.mean().item() == pytest.approx(d.mean[0], abs=2e-3)
    assert "digits" in repr(d) and "1347" in repr(d)


def test_tensor_splits_validates_shapes() -> None:
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.int64)
    TensorSplits("t", x, y, x, y, 2, (1, 2, 2), 255.0, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="item shape"):
        TensorSplits("t", x, y, x, y, 2, (1, 3, 3), 255.0, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="int64"):
        TensorSplits("t", x, y.int(), x, y, 2, (1, 2, 2), 255.0, (0.5,), (0.5,))
