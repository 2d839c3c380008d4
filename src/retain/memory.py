"""A reservoir memory that lives on the training device.

Storage is preallocated tensors (inputs, targets and named metadata columns such as stored
logits or intermediate features); adding a batch, sampling and refreshing metadata are a few
tensor operations with no per-item Python loop, no host/device copies and no host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class MemoryBatch:
    """Items drawn from the memory: their slot ``indices`` (to refresh metadata in place),
    model-ready ``inputs``/``targets`` (buffer transforms applied) and their ``metadata``."""

    indices: Tensor
    inputs: Tensor
    targets: Tensor
    metadata: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.indices.shape[0]


class ReservoirMemory:
    """Fixed-size uniform sample of every item offered so far (Vitter's Algorithm R).

    The t-th item offered (1-based) goes to slot t-1 while the memory is not full; afterwards it
    draws j uniformly from {0, ..., t-1} and replaces slot j if j < memory_size. A batch is added
    in one vectorised step that reproduces the sequential algorithm exactly, including the rule
    that a later item of the batch overwrites an earlier one drawing the same slot. So every
    item seen is in memory with probability memory_size / seen.

    Storage has one spare row past ``memory_size`` where rejected items are written, which keeps
    the write free of data-dependent shapes (and thus of host syncs on a GPU).
    """

    def __init__(
        self,
        memory_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
        target_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an integer >= 0, got {memory_size!r}")
        self.memory_size = memory_size
        self.device = torch.device(device)
        self.transform = transform
        self.target_transform = target_transform
        self.seen = 0
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self.metadata: dict[str, Tensor] = {}
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self._orders: dict[int, Tensor] = {}  # arange(n) per batch size, reused by every write
        self._last_writer: Tensor | None = None  # scratch of reservoir_slots (never read before written)

    def __len__(self) -> int:
        return min(self.seen, self.memory_size)

    # ----------------------------------------------------------------------------- writing
    def _allocate(self, inputs: Tensor, targets: Tensor, metadata: dict[str, Tensor]) -> None:
        rows = self.memory_size + 1
        self.inputs = torch.zeros((rows, *inputs.shape[1:]), dtype=inputs.dtype, device=self.device)
        self.targets = torch.zeros((rows, *targets.shape[1:]), dtype=targets.dtype, device=self.device)
        for name, value in metadata.items():
            self.metadata[name] = torch.zeros((rows, *value.shape[1:]), dtype=value.dtype, device=self.device)

    def _check_compatible(self, inputs: Tensor, targets: Tensor, metadata: dict[str, Tensor]) -> None:
        assert self.inputs is not None and self.targets is not None
        n = inputs.shape[0]
        if targets.shape[0] != n or any(v.shape[0] != n for v in metadata.values()):
            raise ValueError("inputs, targets and metadata must have the same number of items")
        if inputs.shape[1:] != self.inputs.shape[1:] or inputs.dtype != self.inputs.dtype:
            raise ValueError(
                f"memory holds inputs of shape {tuple(self.inputs.shape[1:])} and dtype {self.inputs.dtype}, "
                f"got {tuple(inputs.shape[1:])} {inputs.dtype}"
            )
        if targets.shape[1:] != self.targets.shape[1:] or targets.dtype != self.targets.dtype:
            raise ValueError(
                f"memory holds targets of shape {tuple(self.targets.shape[1:])} and dtype {self.targets.dtype}, "
                f"got {tuple(targets.shape[1:])} {targets.dtype}"
            )
        if set(metadata) != set(self.metadata):
            raise ValueError(f"memory metadata columns are {sorted(self.metadata)}, got {sorted(metadata)}")
        for name, value in metadata.items():
            if value.shape[1:] != self.metadata[name].shape[1:]:
                raise ValueError(
                    f"metadata {name!r} has per-item shape {tuple(self.metadata[name].shape[1:])}, "
                    f"got {tuple(value.shape[1:])}"
                )

    def reservoir_slots(self, n: int) -> Tensor:
        """Slots for the next ``n`` items offered (``memory_size`` = rejected), advancing ``seen``."""
        M = self.memory_size
        start = self.seen
        self.seen += n
        if start + n <= M:
            return torch.arange(start, start + n, device=self.device)
        # Few tensor ops on purpose: this runs at every training step.
        order = self._orders.get(n)
        if order is None:
            order = self._orders[n] = torch.arange(n, device=self.device)
        t = torch.arange(start + 1, start + n + 1, dtype=torch.float64, device=self.device)  # 1-based positions
        u = torch.rand(n, dtype=torch.float64, device=self.device, generator=self.generator)
        slots = u.mul_(t).long()  # uniform in {0, ..., t-1}: truncation is floor as u * t >= 0
        if start < M:  # the memory fills up within this batch
            slots = torch.where(t <= M, order + start, slots)
        slots.clamp_(max=M)
        # Later items win a slot they share with earlier ones, as in the sequential algorithm.
        if self._last_writer is None:
            self._last_writer = torch.empty(M + 1, dtype=torch.long, device=self.device)
        last_writer = self._last_writer  # include_self=False: only the entries written here are read
        last_writer.scatter_reduce_(0, slots, order, reduce="amax", include_self=False)
        return slots.masked_fill_(last_writer[slots] != order, M)

    @torch.no_grad()
    def add(self, inputs: Tensor, targets: Tensor, metadata: dict[str, Tensor] | None = None) -> Tensor:
        """Offers a batch to the reservoir; returns the slot of each item (``memory_size`` = not kept)."""
        metadata = metadata or {}
        n = inputs.shape[0]
        if self.memory_size == 0 or n == 0:
            self.seen += n
            return torch.full((n,), self.memory_size, dtype=torch.long, device=self.device)
        if self.inputs is None:
            self._allocate(inputs, targets, metadata)
        self._check_compatible(inputs, targets, metadata)
        slots = self.reservoir_slots(n)
        assert self.inputs is not None and self.targets is not None
        self.inputs.index_copy_(0, slots, inputs.to(self.device))
        self.targets.index_copy_(0, slots, targets.to(self.device))
        for name, value in metadata.items():
            column = self.metadata[name]
            column.index_copy_(0, slots, value.detach().to(self.device, column.dtype))
        return slots

    # ----------------------------------------------------------------------------- reading
    def sample(self, batch_size: int) -> MemoryBatch | None:
        """Draws up to ``batch_size`` distinct items uniformly; ``None`` while the memory is empty."""
        filled = len(self)
        if filled == 0 or batch_size <= 0:
            return None
        k = min(batch_size, filled)
        if k == filled:
            indices = torch.randperm(filled, device=self.device, generator=self.generator)
        else:
            indices = torch.randperm(filled, device=self.device, generator=self.generator)[:k]
        return self.get(indices)

    def get(self, indices: Tensor) -> MemoryBatch:
        """The items at ``indices``, with the buffer transforms applied."""
        assert self.inputs is not None and self.targets is not None
        inputs = self.inputs[indices]
        targets = self.targets[indices]
        if self.transform is not None:
            inputs = self.transform(inputs)
        if self.target_transform is not None:
            targets = self.target_transform(targets)
        return MemoryBatch(indices, inputs, targets, {k: v[indices] for k, v in self.metadata.items()})

    @torch.no_grad()
    def update_metadata(self, name: str, indices: Tensor, values: Tensor, gamma: float = 0.0) -> None:
        """In place: ``metadata[name][indices] = gamma * old + (1 - gamma) * values``."""
        column = self.metadata[name]
        values = values.detach().to(column.dtype)
        if gamma == 0.0:
            column[indices] = values
        else:
            column[indices] = column[indices].mul_(gamma).add_(values, alpha=1.0 - gamma)

    def set_metadata(self, name: str, values: Tensor) -> None:
        """Creates or replaces a metadata column for all filled slots (e.g. refreshed logits)."""
        filled = len(self)
        if values.shape[0] != filled:
            raise ValueError(f"metadata {name!r} needs {filled} rows, got {values.shape[0]}")
        column = torch.zeros((self.memory_size + 1, *values.shape[1:]), dtype=values.dtype, device=self.device)
        column[:filled] = values.detach().to(self.device)
        self.metadata[name] = column

    def raw_items(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The stored items as they were added (no transforms), filled slots only."""
        filled = len(self)
        if self.inputs is None or self.targets is None:
            raise ValueError("the memory is empty")
        return self.inputs[:filled], self.targets[:filled], {k: v[:filled] for k, v in self.metadata.items()}

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(JSON counters, tensors): contiguous CPU copies of the filled slots and the RNG state."""
        filled = len(self)
        tensors: dict[str, Tensor] = {"generator_state": self.generator.get_state().clone()}
        if self.inputs is not None and self.targets is not None:
            tensors["inputs"] = self.inputs[:filled].detach().cpu().contiguous().clone()
            tensors["targets"] = self.targets[:filled].detach().cpu().contiguous().clone()
            for name, column in self.metadata.items():
                tensors[f"metadata.{name}"] = column[:filled].detach().cpu().contiguous().clone()
        meta = {"memory_size": self.memory_size, "seen": self.seen, "metadata_names": sorted(self.metadata)}
        return meta, tensors

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restores a state from ``state_dict``; the restored memory continues exactly as the original."""
        if meta["memory_size"] != self.memory_size:
            raise ValueError(
                f"state holds a memory of size {meta['memory_size']}, this one has memory_size={self.memory_size}"
            )
        seen = int(meta["seen"])
        filled = min(seen, self.memory_size)
        names = list(meta["metadata_names"])
        expected = {"generator_state"} | ({"inputs", "targets"} | {f"metadata.{n}" for n in names} if filled else set())
        if set(tensors) != expected:
            raise ValueError(f"memory state has tensors {sorted(tensors)}, expected {sorted(expected)}")
        self.seen = seen
        self.inputs, self.targets, self.metadata = None, None, {}
        if filled:
            for name in ["inputs", "targets", *[f"metadata.{n}" for n in names]]:
                if tensors[name].shape[0] != filled:
                    raise ValueError(f"memory tensor {name!r} has {tensors[name].shape[0]} rows, expected {filled}")
            self._allocate(tensors["inputs"], tensors["targets"], {n: tensors[f"metadata.{n}"] for n in names})
            assert self.inputs is not None and self.targets is not None
            self.inputs[:filled] = tensors["inputs"].to(self.device)
            self.targets[:filled] = tensors["targets"].to(self.device)
            for n in names:
                self.metadata[n][:filled] = tensors[f"metadata.{n}"].to(self.device)
        self.generator.set_state(tensors["generator_state"].to(torch.uint8).cpu())
