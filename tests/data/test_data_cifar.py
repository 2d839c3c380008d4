"""CIFAR readers on small synthetic tarballs in the original layout, and the restricted unpickler."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from retain.data import datasets
from retain.data.datasets import DatasetFileError, load_dataset, safe_unpickle


def test_official_cifar_checksums() -> None:
    c10 = datasets.FILE_SPECS["cifar10"]["cifar-10-python.tar.gz"]
    c100 = datasets.FILE_SPECS["cifar100"]["cifar-100-python.tar.gz"]
    assert (c10.algorithm, c10.digest, c10.size) == ("md5", "c58f30108f718f92721af3b95e74349a", 170498071)
    assert (c100.algorithm, c100.digest, c100.size) == ("md5", "eb9058c3a382ffc7106e4002c42a8d85", 169001437)
    assert c10.urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)


def test_py2_style_pickle_matches_standard_unpickler(py2_pickler) -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = {b"data": data, b"labels": [3, 300, 70000, -1], b"batch_label": b"x" * 300, b"none": None}
    blob = py2_pickler(obj)
    for loaded in (pickle.loads(blob, encoding="bytes"), safe_unpickle(blob)):
        assert loaded.keys() == obj.keys()
        np.testing.assert_array_equal(loaded[b"data"], data)
        assert loaded[b"data"].dtype == np.uint8
        assert loaded[b"labels"] == [3, 300, 70000, -1]
        assert loaded[b"batch_label"] == b"x" * 300


def test_safe_unpickle_accepts_python3_numpy_pickles() -> None:
    obj = {b"data": np.ones((2, 3072), np.uint8), b"labels": [1, 2]}
    loaded = safe_unpickle(pickle.dumps(obj, protocol=4))
    np.testing.assert_array_equal(loaded[b"data"], obj[b"data"])


@pytest.mark.parametrize("in_subfolder", [True, False])
def test_cifar10_layout_and_values(tmp_path: Path, fake_cifar, in_subfolder: bool) -> None:
    folder = tmp_path / "cifar10" if in_subfolder else tmp_path
    expected = fake_cifar(folder / "cifar-10-python.tar.gz", "cifar10", per_batch=12, n_test=15)
    splits = load_dataset("cifar10", tmp_path, download=False)
    assert splits.train_inputs.shape == (60, 3, 32, 32) and splits.train_inputs.dtype == torch.uint8
    assert splits.test_inputs.shape == (15, 3, 32, 32)
    assert splits.train_targets.dtype == torch.int64
    assert (splits.num_classes, splits.input_shape, splits.scale) == (10, (3, 32, 32), 255.0)
    assert len(splits.mean) == len(splits.std) == 3
    for part in ("train_inputs", "train_targets", "test_inputs", "test_targets"):
        np.testing.assert_array_equal(getattr(splits, part).numpy(), expected[part])
    # channel-major layout: the first 1024 bytes of a row are the red plane
    assert splits.train_inputs[0, 0, 0, 1] == expected["train_inputs"].reshape(-1, 3072)[0, 1]


def test_cifar100_uses_fine_labels(tmp_path: Path, fake_cifar) -> None:
    expected = fake_cifar(tmp_path / "cifar100" / "cifar-100-python.tar.gz", "cifar100", per_batch=8,
                          n_test=10, seed=3)
    splits = load_dataset("cifar100", tmp_path, download=False)
    assert splits.num_classes == 100
    assert splits.train_inputs.shape == (40, 3, 32, 32)
    np.testing.assert_array_equal(splits.train_targets.numpy(), expected["train_targets"])
    np.testing.assert_array_equal(splits.test_inputs.numpy(), expected["test_inputs"])


def test_cifar_second_load_comes_from_cache(tmp_path: Path, fake_cifar, monkeypatch) -> None:
    fake_cifar(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar10", seed=5)
    first = load_dataset("cifar10", tmp_path, download=False)

    def fail(*args, **kwargs):
        raise AssertionError("tarball read again")

    monkeypatch.setattr(datasets, "read_cifar_tarball", fail)
    second = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(first.train_inputs, second.train_inputs)


def test_cifar_tarball_checked_before_reading(tmp_path: Path, fake_cifar) -> None:
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    fake_cifar(path, "cifar10", seed=6)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    spec = datasets.FILE_SPECS["cifar10"]["cifar-10-python.tar.gz"]
    with pytest.raises(DatasetFileError, match=spec.digest) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(path) in str(info.value)


def test_missing_member_is_reported(tmp_path: Path, fake_cifar) -> None:
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    fake_cifar(path, "cifar10", seed=7, replace_member={"data_batch_4": None})
    with pytest.raises(DatasetFileError, match="data_batch_4") as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(path) in str(info.value)


def test_wrong_batch_content_is_reported(tmp_path: Path, fake_cifar, py2_pickler) -> None:
    bad = py2_pickler({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    fake_cifar(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar10", replace_member={"test_batch": bad})
    with pytest.raises(DatasetFileError, match=r"test_batch.*\(N, 3072\)"):
        load_dataset("cifar10", tmp_path, download=False)


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemCall, _ExecCall])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, fake_cifar, payload, protocol) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": payload(marker), b"labels": [0]}, protocol=protocol)
    fake_cifar(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar10",
               replace_member={"data_batch_3": evil})
    with pytest.raises(DatasetFileError, match="refusing to load global") as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert "data_batch_3" in str(info.value)
    assert not marker.exists()
    # the restricted unpickler itself refuses, the standard one would have run it
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        safe_unpickle(evil)
    assert not marker.exists()
