"""Batches of a dataset on the training device, built once per epoch (never per step).

Tensor-backed datasets (``TensorDataset`` and ``Subset``s of one) take a fast path: their tensors
are moved to the device once and every epoch is a single on-device permutation sliced into
batches. Any other ``Dataset`` goes through one ``DataLoader`` per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(inputs, targets)`` of a tensor-backed dataset with two tensors, else ``None``."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = dataset_tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


def materialize(dataset: Dataset, collate_fn: Callable | None = None, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """All items of ``dataset`` as two stacked tensors (inputs, targets)."""
    fast = dataset_tensors(dataset)
    if fast is not None:
        return fast
    inputs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        inputs.append(torch.as_tensor(x))
        targets.append(torch.as_tensor(y))
    if not inputs:
        raise ValueError("the dataset is empty")
    return torch.cat(inputs), torch.cat(targets)


class BatchSource:
    """Iterable over the batches of one epoch; ``len`` is the number of batches."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        generator: torch.Generator | None = None,
        collate_fn: Callable | None = None,
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the dataset is empty: an update needs at least one item")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        self.collate_fn = collate_fn
        tensors = dataset_tensors(dataset) if collate_fn is None else None
        self.tensors: tuple[Tensor, Tensor] | None = None
        if tensors is not None:
            self.tensors = (tensors[0].to(device), tensors[1].to(device))

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return (n + self.batch_size - 1) // self.batch_size

    def first_batch(self) -> tuple[Tensor, Tensor]:
        """The first ``batch_size`` items in dataset order, on the device, for checks before training.

        Collated directly (no DataLoader, no draw from the shuffling generator), so the epochs
        still cost exactly one DataLoader each.
        """
        if self.tensors is not None:
            return self.tensors[0][: self.batch_size], self.tensors[1][: self.batch_size]
        n = min(self.batch_size, len(self.dataset))  # type: ignore[arg-type]
        collate = self.collate_fn if self.collate_fn is not None else default_collate
        x, y = collate([self.dataset[i] for i in range(n)])
        return torch.as_tensor(x).to(self.device), torch.as_tensor(y).to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.tensors is None:
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                shuffle=self.shuffle,
                generator=self.generator,
                collate_fn=self.collate_fn,
            )
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        inputs, targets = self.tensors
        n = inputs.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield inputs[idx], targets[idx]
        else:
            for start in range(0, n, self.batch_size):
                yield inputs[start : start + self.batch_size], targets[start : start + self.batch_size]
