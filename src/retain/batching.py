"""Batches of a dataset on the training device, built once per epoch (never per step).

Items are ``(inputs, target)`` where ``inputs`` is nested (``retain.nested``: a tensor, a
tuple/list or a dict of tensors). What a batch may look like once collated (by the default
collate or the user's ``collate_fn``), and how it splits into ``(inputs, targets)``:

- ``(x, y)`` (a 2-sequence): ``x`` nested, ``y`` the labels;
- ``(x1, ..., xk, y)`` (k > 1, e.g. a three-tensor ``TensorDataset``): ``((x1, ..., xk), y)``;
- a dict with a ``"labels"`` (or ``"label"``) entry, as HuggingFace collators return: the labels
  and the dict of the other entries (so a HuggingFace model is not handed ``labels``).

Lists inside inputs become tuples, so a batch has the same structure on every path.

Tensor-backed datasets (``TensorDataset`` and ``Subset``s of one, with no collate function) take
a fast path: their tensors are moved to the device once and every epoch is a single on-device
permutation sliced into batches. Any other map-style ``Dataset`` goes through one ``DataLoader``
(built once per update, so ``persistent_workers`` keeps its workers across epochs). An
``IterableDataset`` is a stream of unknown length: each epoch is one pass, in its own order
(with ``num_workers > 1`` the dataset must split itself between workers with
``torch.utils.data.get_worker_info()``, as PyTorch requires). A user's ``DataLoader`` is
unwrapped by ``unwrap_loader``: its dataset and collate function are used, its workers and
pinning unless the options set them, and retain's ``batch_size`` replaces the loader's (the
memory's share of a step depends on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, default_collate

import retain.nested as nested
from retain.nested import NestedTensors

LABEL_KEYS = ("labels", "label")


@dataclass(frozen=True)
class LoaderOptions:
    """The DataLoader settings of a non-tensor dataset (``TrainingOptions`` gives them)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False


def _tuples(x: Any) -> Any:
    """``x`` with every list (as ``default_collate`` makes of tuple items) turned into a tuple."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, list | tuple):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def split_batch(batch: Any, where: str = "batch") -> tuple[NestedTensors, Tensor]:
    """``(inputs, targets)`` of a collated batch (see the module docstring for the accepted forms)."""
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"{where}: a dict batch needs a 'labels' or 'label' entry, got keys {sorted(map(str, batch))}"
            )
        inputs = {k: v for k, v in batch.items() if k != key}
        if not inputs:
            raise ValueError(f"{where}: a dict batch holds only {key!r}, no inputs")
        targets = batch[key]
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
        targets = batch[-1]
    else:
        raise ValueError(
            f"{where}: expected (inputs, targets), (x1, ..., xk, targets) or a dict with 'labels', "
            f"got a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        )
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{where}: targets of type {type(targets).__name__} are not a tensor: {err}") from None
    inputs = _tuples(inputs)
    try:
        nested.leaves(inputs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    return inputs, as_class_indices(targets)


def as_class_indices(targets: Tensor) -> Tensor:
    """Integer labels of any integer dtype as int64 (what the losses and the memory take), e.g. the
    int32 labels numpy gives; floating or bool targets are left for the data checks to refuse."""
    if targets.dtype != torch.long and not targets.dtype.is_floating_point and targets.dtype != torch.bool:
        return targets.long()
    return targets


def first_bad_item(inputs: NestedTensors, targets: Tensor, num_classes: int | None) -> tuple[int, str] | None:
    """``(position, problem)`` of the first item of a batch with a label outside ``[0, num_classes)``
    or a NaN/Inf input, else ``None`` (one host check of the batch; the search runs only on failure)."""
    bad = torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
    if num_classes is not None and targets.dim() == 1 and not targets.dtype.is_floating_point:
        bad |= (targets < 0) | (targets >= num_classes)
    for _, leaf in nested.leaves(inputs):
        if leaf.dtype.is_floating_point and leaf.dim() >= 1 and leaf.shape[0] == targets.shape[0]:
            bad |= ~torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return None
    position = int(bad.nonzero()[0, 0])
    label = int(targets[position]) if targets.dim() == 1 and not targets.dtype.is_floating_point else None
    if num_classes is not None and label is not None and not 0 <= label < num_classes:
        return position, f"label {label} lies outside [0, {num_classes - 1}] for this model"
    return position, "its inputs contain NaN or Inf"


def unwrap_loader(
    data: Dataset | DataLoader, collate_fn: Callable | None = None, options: LoaderOptions | None = None
) -> tuple[Dataset, Callable | None, LoaderOptions]:
    """``(dataset, collate_fn, loader options)`` of a dataset or of a user's ``DataLoader``.

    A ``DataLoader``'s dataset and collate function are used (an explicit ``collate_fn`` wins),
    and its workers / pinning where ``options`` leave them at their defaults."""
    options = options or LoaderOptions()
    if not isinstance(data, DataLoader):
        return data, collate_fn, options
    if collate_fn is None and data.collate_fn is not default_collate:
        collate_fn = data.collate_fn
    merged = LoaderOptions(
        num_workers=options.num_workers or data.num_workers,
        pin_memory=options.pin_memory or data.pin_memory,
        persistent_workers=options.persistent_workers or data.persistent_workers,
    )
    return data.dataset, collate_fn, merged


def is_iterable(dataset: Any) -> bool:
    """True for a stream (``IterableDataset``): no length, no indexing, one pass per epoch."""
    return isinstance(dataset, IterableDataset)


def dataset_length(dataset: Any) -> int | None:
    """Number of items, or ``None`` for a stream of unknown length."""
    if is_iterable(dataset):
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return len(dataset)  # type: ignore[arg-type]


class NestedTensorDataset(Dataset):
    """Items ``(inputs[i], targets[i])`` of nested inputs held as tensors (one per leaf), on the
    tensor fast path like a ``TensorDataset``."""

    def __init__(self, inputs: NestedTensors, targets: Tensor) -> None:
        n = nested.batch_size(inputs)
        if targets.shape[0] != n:
            raise ValueError(f"NestedTensorDataset: {n} inputs but {targets.shape[0]} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[NestedTensors, Tensor]:
        return nested.index(self.inputs, i), self.targets[i]


def dataset_tensors(dataset: Dataset) -> tuple[NestedTensors, Tensor] | None:
    """``(inputs, targets)`` of a tensor-backed dataset, else ``None``; a ``TensorDataset`` of more
    than two tensors has the tuple of all but the last as inputs."""
    if isinstance(dataset, NestedTensorDataset):
        return dataset.inputs, dataset.targets
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        tensors = dataset.tensors
        inputs = tensors[0] if len(tensors) == 2 else tuple(tensors[:-1])
        return inputs, tensors[-1]
    if isinstance(dataset, Subset):
        inner = dataset_tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            return nested.index(inner[0], idx), inner[1][idx]
    return None


def _loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable | None,
    options: LoaderOptions | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> DataLoader:
    options = options or LoaderOptions()
    workers = options.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not is_iterable(dataset),
        generator=generator,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=options.pin_memory and device is not None and device.type == "cuda",
        persistent_workers=options.persistent_workers and workers > 0,
    )


def iter_batches(
    dataset: Dataset,
    batch_size: int = 512,
    collate_fn: Callable | None = None,
    device: torch.device | None = None,
    options: LoaderOptions | None = None,
    where: str = "dataset",
) -> Iterator[tuple[NestedTensors, Tensor]]:
    """Every item of ``dataset`` once, in order, as ``(inputs, targets)`` batches (streamed: one
    batch in memory at a time), moved to ``device`` when given."""
    fast = dataset_tensors(dataset) if collate_fn is None else None
    if fast is not None:
        inputs, targets = fast
        n = targets.shape[0]
        for start in range(0, n, batch_size):
            x, y = nested.index(inputs, slice(start, start + batch_size)), targets[start : start + batch_size]
            yield (nested.to_device(x, device), y.to(device)) if device is not None else (x, y)
        return
    for batch in _loader(dataset, batch_size, collate_fn, options, device=device):
        x, y = split_batch(batch, where)
        yield (nested.to_device(x, device, non_blocking=True), y.to(device, non_blocking=True)) if device else (x, y)


def dataset_labels(
    dataset: Dataset, collate_fn: Callable | None = None, options: LoaderOptions | None = None
) -> Tensor:
    """The labels of every item (1-D), without keeping any inputs: from the tensors of a tensor
    dataset, a ``targets``/``labels`` attribute of the dataset, or else read batch by batch."""
    fast = dataset_tensors(dataset) if collate_fn is None else None
    if fast is not None:
        return fast[1]
    if isinstance(dataset, Subset) and collate_fn is None:
        inner = _declared_labels(dataset.dataset)
        if inner is not None:
            return inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    declared = _declared_labels(dataset) if collate_fn is None else None
    if declared is not None:
        return declared
    parts = [y.reshape(-1) for _, y in iter_batches(dataset, 512, collate_fn, options=options)]
    if not parts:
        raise ValueError("the dataset is empty")
    return torch.cat(parts)


def _declared_labels(dataset: Any) -> Tensor | None:
    if is_iterable(dataset):
        return None
    for name in ("targets", "labels"):
        value = getattr(dataset, name, None)
        if isinstance(value, Tensor | list | tuple) and not callable(value):
            try:
                labels = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                continue
            if labels.dim() == 1 and labels.shape[0] == len(dataset) and not labels.dtype.is_floating_point:
                return labels
    return None


def materialize(
    dataset: Dataset,
    collate_fn: Callable | None = None,
    batch_size: int = 512,
    pad_values: Mapping[str, float] | None = None,
) -> tuple[NestedTensors, Tensor]:
    """All items of ``dataset`` held at once: nested inputs (each leaf padded to its longest
    item with its pad value) and targets. Only what must hold data (the joint baseline) uses it."""
    fast = dataset_tensors(dataset) if collate_fn is None else None
    if fast is not None:
        return fast
    inputs, targets = [], []
    for x, y in iter_batches(dataset, batch_size, collate_fn):
        inputs.append(x)
        targets.append(y.reshape(-1))
    if not inputs:
        raise ValueError("the dataset is empty")
    return nested.cat(inputs, pad_values), torch.cat(targets)


def describe_inputs(inputs: NestedTensors) -> str:
    """Per-item shapes and dtypes, for error messages: ``of shape (..) and dtype ..`` for a tensor,
    ``(path: shape dtype, ...)`` for nested inputs."""
    if isinstance(inputs, Tensor):
        return f"of shape {tuple(inputs.shape[1:])} and dtype {inputs.dtype}"
    return "(" + ", ".join(f"{path}: {tuple(t.shape[1:])} {t.dtype}" for path, t in nested.leaves(inputs)) + ")"


class BatchSource:
    """Iterable over the batches of one epoch. ``num_batches`` is ``None`` for a stream."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        generator: torch.Generator | None = None,
        collate_fn: Callable | None = None,
        loader_options: LoaderOptions | None = None,
        where: str = "dataset",
    ) -> None:
        self.length = dataset_length(dataset)
        if self.length == 0:
            raise ValueError(f"{where} is empty: an update needs at least one item")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        self.collate_fn = collate_fn
        self.loader_options = loader_options or LoaderOptions()
        self.where = where
        self._loader: DataLoader | None = None
        self.num_classes: int | None = None  # set once known: batches from a loader are then checked
        tensors = dataset_tensors(dataset) if collate_fn is None else None
        self.tensors: tuple[NestedTensors, Tensor] | None = None
        if tensors is not None:
            self.tensors = (nested.to_device(tensors[0], device), as_class_indices(tensors[1]).to(device))

    @property
    def is_stream(self) -> bool:
        return self.length is None

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch; ``None`` for a stream of unknown length."""
        if self.length is None:
            return None
        return (self.length + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError(f"{self.where} is a stream of unknown length (an IterableDataset without __len__)")
        return n

    def first_batch(self) -> tuple[NestedTensors, Tensor]:
        """The first ``batch_size`` items in dataset order, on the device, for checks before training.

        Collated directly for a map-style dataset (no DataLoader, no draw from the shuffling
        generator), so the epochs still cost exactly one DataLoader each; a stream is read by a
        worker-free DataLoader up to its first batch.
        """
        if self.tensors is not None:
            inputs, targets = self.tensors
            return nested.index(inputs, slice(0, self.batch_size)), targets[: self.batch_size]
        collate = self.collate_fn if self.collate_fn is not None else default_collate
        if self.is_stream:
            batch = next(iter(DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate)), None)
            if batch is None:
                raise ValueError(f"{self.where} is empty: an update needs at least one item")
        else:
            n = min(self.batch_size, self.length or 0)
            batch = collate([self.dataset[i] for i in range(n)])
        x, y = split_batch(batch, self.where)
        return nested.to_device(x, self.device), y.to(self.device)

    def _check_loaded(self, inputs: NestedTensors, targets: Tensor, seen: int) -> None:
        """A bad label or a NaN/Inf input anywhere in the data is one ValueError naming the item
        (its index in a map-style dataset, its position in a stream), never an IndexError later."""
        found = first_bad_item(inputs, targets, self.num_classes)
        if found is None:
            return
        position, problem = found
        if self.is_stream or self.shuffle:
            index = self._locate_bad_item() if not self.is_stream else None
            where = f"item {index}" if index is not None else f"item {seen + position} of the stream"
        else:
            where = f"item {seen + position}"
        raise ValueError(f"{self.where}: {where}: {problem}")

    def _locate_bad_item(self) -> int | None:
        """The index of the first bad item of a map-style dataset (read item by item: error path only)."""
        collate = self.collate_fn if self.collate_fn is not None else default_collate
        for i in range(self.length or 0):
            x, y = split_batch(collate([self.dataset[i]]), self.where)
            if first_bad_item(x, y, self.num_classes) is not None:
                return i
        return None

    def __iter__(self) -> Iterator[tuple[NestedTensors, Tensor]]:
        if self.tensors is None:
            if self._loader is None:
                self._loader = _loader(
                    self.dataset, self.batch_size, self.collate_fn, self.loader_options,
                    self.shuffle, self.generator, self.device,
                )  # fmt: skip
            seen = 0
            for batch in self._loader:
                x, y = split_batch(batch, self.where)
                if self.num_classes is not None or self.is_stream:
                    self._check_loaded(x, y, seen)  # on the host, before the batch reaches the model
                seen += y.shape[0]
                yield nested.to_device(x, self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        inputs, targets = self.tensors
        n = targets.shape[0]
        bare = isinstance(inputs, Tensor)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield (inputs[idx] if bare else nested.index(inputs, idx)), targets[idx]  # type: ignore[index]
        else:
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                yield (inputs[rows] if bare else nested.index(inputs, rows)), targets[rows]  # type: ignore[index]
