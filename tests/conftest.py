"""Fixtures shared by every test folder: the real-data folder and a small class-incremental digits stream."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_TASK_CLASSES = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tests train tiny models on a shared 2-core machine, where torch's intra-op threads mostly
    wait for each other (measured 5-10x slower than one thread under load). Runs the session
    on one thread; subprocesses that must match in-process results bit for bit do the same."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder holding the real ``mnist/`` and ``fashion-mnist/`` files, or skip the test.

    Looked up in ``$RETAIN_TEST_DATA_DIR``, then ``../shared/data`` relative to the repository root.
    The one definition for every test folder.
    """
    env = os.environ.get("RETAIN_TEST_DATA_DIR")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared" / "data"]
    for path in candidates:
        if (path / "mnist").is_dir() and (path / "fashion-mnist").is_dir():
            return path
    pytest.skip("shared data not found: set RETAIN_TEST_DATA_DIR to the folder with mnist/ and fashion-mnist/")


class MapDataset(Dataset):
    """A map-style dataset of ``(inputs[i], targets[i])`` that is not tensor-backed, so updaters and
    readers take their DataLoader path instead of the TensorDataset fast path."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.targets[i]


@pytest.fixture(scope="session")
def map_dataset() -> type[MapDataset]:
    """The ``MapDataset`` class (one definition shared by every test folder)."""
    return MapDataset


def make_digits_tasks(seed: int = 0) -> list[tuple[TensorDataset, tuple[Tensor, Tensor]]]:
    """sklearn's 8x8 digits as float tensors (N, 1, 8, 8) in [0, 1], split into the five
    class-incremental tasks {0,1}, {2,3}, ..., {8,9}; each task's items split 75/25 (fixed
    permutation) into a train ``TensorDataset`` and test ``(inputs, targets)`` tensors."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    tasks = []
    for classes in DIGITS_TASK_CLASSES:
        idx = np.flatnonzero(np.isin(digits.target, classes))
        idx = torch.as_tensor(rng.permutation(idx))
        cut = round(0.75 * len(idx))
        train, test = idx[:cut], idx[cut:]
        tasks.append((TensorDataset(inputs[train], targets[train]), (inputs[test], targets[test])))
    return tasks


@pytest.fixture(scope="session")
def digits_tasks() -> list[tuple[TensorDataset, tuple[Tensor, Tensor]]]:
    """Five class-incremental digits tasks: ``[(train TensorDataset, (test inputs, test targets)), ...]``."""
    return make_digits_tasks()
