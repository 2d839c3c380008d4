"""A reservoir memory of nested inputs, on the training device or in host memory.

Storage is one tensor column per input leaf (see ``retain.nested``), a 1-D int64 target column
and named metadata columns (stored logits, pooled features). Adding a batch, sampling and
refreshing metadata are a few tensor operations with no per-item Python loop and no host syncs.

- **Growing storage.** Columns start small and double (up to ``memory_size + 1`` rows) as items
  arrive, so 1,000 items in a 200k memory cost 1,000 items of memory, not 200k.
- **Variable-length leaves.** A leaf longer than its column in a non-batch dim (a batch padded
  to its longest sequence) grows the column along that dim, filled with the leaf's pad value; a
  shorter leaf is padded on write. Sampled leaves come at the column's length; join them with a
  new batch through ``nested.cat([new, replayed], memory.pad_values)``.
- **Sampling in O(k).** ``sample(k)`` draws k distinct slots uniformly with a vectorised Floyd
  algorithm whose cost does not depend on how many items the memory holds.
- **Host memory.** ``memory_device='cpu'`` or ``'pinned'`` keeps the columns in host memory
  (page-locked with ``'pinned'`` when CUDA is available); only sampled batches are copied to the
  training device, asynchronously from pinned memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

import retain.nested as nested
from retain.nested import NestedTensors
from retain.state import all_finite

MEMORY_DEVICES = ("same", "cpu", "pinned")
INITIAL_ROWS = 64  # first allocation (rows); storage then doubles up to memory_size + 1
FLOYD_MIN_ITEMS = 16_384  # below this many items one randperm costs less than Floyd's ~20 small ops
_INT64_MAX = 2**63 - 1
_MAX_SEEN = 2**53  # reservoir_slots draws positions as float64, exact for integers up to 2**53
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.bool,
    )
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


class MemoryStateError(ValueError):
    """A memory state that does not load: ``in_json`` says whether the JSON description (memory.json)
    or the tensors (memory.safetensors) are at fault, so that a caller can name the file."""

    def __init__(self, message: str, in_json: bool) -> None:
        super().__init__(f"memory state: {message}")
        self.in_json = in_json


@dataclass
class MemoryBatch:
    """Items drawn from the memory: their slot ``indices`` (on the memory's storage device, to
    refresh metadata in place), model-ready ``inputs``/``targets`` on the training device (buffer
    transforms applied) and their ``metadata``."""

    indices: Tensor
    inputs: NestedTensors
    targets: Tensor
    metadata: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.indices.shape[0]


# --------------------------------------------------------------------------------- sampling
def floyd_resolve(t: Tensor, n: int, jumps: int | None = None) -> Tensor:
    """Floyd's k distinct outputs from its independent draws ``t`` (``t[..., i]`` uniform in [0, n-k+i]).

    Sequentially, step i adds ``j_i = n-k+i`` if ``t_i`` is already an output, else ``t_i``. The
    step collides iff ``t_i`` equals an earlier draw (``dup_i``) or ``t_i = j_p`` for an earlier
    step ``p = t_i - (n-k)`` that itself collided. So each step points to a "collided" sentinel
    when ``dup_i``, else to step ``p`` (to itself when ``p = i``, to a "free" sentinel when there
    is no such step), and ``ceil(log2 k)`` pointer-jumping steps resolve every chain (a chain
    visits at most k steps); ``jumps`` overrides that count (only to test a biased variant).
    Leading dims of ``t`` are independent draws (one call resolves many samples, for tests).
    """
    k = t.shape[-1]
    base = n - k
    rows = t if t.dim() == 1 else t.unsqueeze(-2)
    dup = (t.unsqueeze(-1) == rows).tril_(-1).any(-1)  # t_i equals some t_m, m < i
    # Positions: 0 = free sentinel, 1..k = steps 0..k-1, k+1 = collided sentinel.
    pointer = (t - (base - 1)).clamp_(min=0).masked_fill_(dup, k + 1)
    free, collided = _sentinels(k, t.device)
    if t.dim() > 1:
        free, collided = free.expand(*t.shape[:-1], 1), collided.expand(*t.shape[:-1], 1)
    pointer = torch.cat((free, pointer, collided), dim=-1)
    for _ in range((k - 1).bit_length() if jumps is None else jumps):  # ceil(log2 k) for k >= 1
        pointer = pointer.gather(-1, pointer)
    return torch.where(pointer[..., 1:-1] == k + 1, _steps(n, k, t.device), t)


_CACHE: dict[tuple[str, int, int, torch.device], Tensor] = {}


def _cached(kind: str, a: int, b: int, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    key = (kind, a, b, device)
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) > 256:  # a few (n, k) pairs are live at a time; the fill phase makes more
            _CACHE.clear()
        value = _CACHE[key] = build()
    return value


def _sentinels(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The pointers of the free (0) and collided (k + 1) sentinels, each pointing to itself."""
    return (
        _cached("free", k, 0, device, lambda: torch.zeros(1, dtype=torch.long, device=device)),
        _cached("collided", k, 0, device, lambda: torch.full((1,), k + 1, dtype=torch.long, device=device)),
    )


def _steps(n: int, k: int, device: torch.device) -> Tensor:
    """``j_i = n - k + i``, Floyd's candidates (int64)."""
    return _cached("j", n, k, device, lambda: torch.arange(n - k, n, device=device))


def sample_without_replacement(
    n: int, k: int, generator: torch.Generator, device: torch.device | str | None = None
) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)`` in uniformly random order.

    Cost O(k^2) elementwise in one kernel and O(k log k) otherwise, independent of ``n``
    (vectorised Floyd, ``floyd_resolve``), with no host sync: ``n`` and ``k`` are Python ints.
    Below ``FLOYD_MIN_ITEMS`` items (or for ``k == n``) a whole ``randperm(n)`` costs less than
    Floyd's fixed number of tensor ops and is used instead.
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct items out of {n}")
    if not isinstance(device, torch.device):
        device = torch.device(device) if device is not None else generator.device
    if n < FLOYD_MIN_ITEMS or k == n:
        perm = torch.randperm(n, device=device, generator=generator)
        return perm if k == n else perm[:k]
    bounds = _cached("j+1", n, k, device, lambda: torch.arange(n - k + 1, n + 1, dtype=torch.float64, device=device))
    u = torch.rand(k, dtype=torch.float64, device=device, generator=generator)
    t = u.mul_(bounds).long()  # uniform in {0, ..., j_i}: truncation is floor as u * (j_i + 1) >= 0
    chosen = floyd_resolve(t, n)
    return chosen[torch.randperm(k, device=device, generator=generator)]  # a uniform order too


# --------------------------------------------------------------------------------- the memory
def _input_key(path: str) -> str:
    return f"inputs.{path}" if path else "inputs"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _where(path: str) -> str:
    return f"input leaf {path!r}" if path else "inputs"


class ReservoirMemory:
    """Fixed-size uniform sample of every item offered so far (Vitter's Algorithm R).

    The t-th item offered (1-based) goes to slot t-1 while the memory is not full; afterwards it
    draws j uniformly from {0, ..., t-1} and replaces slot j if j < memory_size. A batch is added
    in one vectorised step that reproduces the sequential algorithm exactly, including the rule
    that a later item of the batch overwrites an earlier one drawing the same slot. So every
    item seen is in memory with probability memory_size / seen.

    Storage has one spare row past ``memory_size`` where rejected items are written, which keeps
    the write free of data-dependent shapes (and thus of host syncs on a GPU). It grows
    geometrically from ``INITIAL_ROWS`` rows (``preallocate=True`` allocates all
    ``memory_size + 1`` rows at the first write instead); growth changes no stored bit and no draw.

    ``memory_device``: ``'same'`` keeps the columns on ``device``; ``'cpu'`` keeps them in host
    memory; ``'pinned'`` in page-locked host memory when CUDA is available (plain host memory
    otherwise). In host modes slots are drawn on the host, sampled batches are copied to ``device``
    with ``non_blocking=True``, and a write copies the new batch to the host (waiting for it).
    ``pad_values`` maps input leaf paths to the value variable-length leaves are padded with
    (default 0).
    """

    def __init__(
        self,
        memory_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        memory_device: str = "same",
        pad_values: Mapping[str, float] | None = None,
        preallocate: bool = False,
    ) -> None:
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an integer >= 0, got {memory_size!r}")
        if memory_device not in MEMORY_DEVICES:
            raise ValueError(f"memory_device must be one of {', '.join(MEMORY_DEVICES)}, got {memory_device!r}")
        self.memory_size = memory_size
        self.device = torch.device(device)
        self.memory_device = memory_device
        self.storage_device = self.device if memory_device == "same" else torch.device("cpu")
        self._pin = memory_device == "pinned" and torch.cuda.is_available()
        self._host = self.storage_device != self.device
        self.pad_values = _check_pad_values(pad_values or {}, "pad_values")
        self.preallocate = bool(preallocate)
        self.transform = transform
        self.target_transform = target_transform
        self.seen = 0
        self.structure: Any = None  # nested.structure of the stored inputs, None until the first write
        self.columns: dict[str, Tensor] = {}  # one column per input leaf path
        self.targets: Tensor | None = None
        self.metadata: dict[str, Tensor] = {}
        self.generator = torch.Generator(device=self.storage_device)
        self.generator.manual_seed(int(seed))
        self._orders: dict[int, Tensor] = {}  # arange(n) per batch size, reused by every write
        self._last_writer: Tensor | None = None  # scratch of reservoir_slots (never read before written)
        self._prepared: dict[str, Tensor] = {}  # columns a state is being read into (load_buffers)

    def __len__(self) -> int:
        return min(self.seen, self.memory_size)

    def empty_like(self, memory_size: int | None = None, seed: int = 0) -> ReservoirMemory:
        """A new, empty memory with this one's settings (devices, pad values, transforms, storage policy),
        e.g. for the DDP shards and the merged memory."""
        return ReservoirMemory(
            self.memory_size if memory_size is None else memory_size,
            device=self.device,
            seed=seed,
            transform=self.transform,
            target_transform=self.target_transform,
            memory_device=self.memory_device,
            pad_values=self.pad_values,
            preallocate=self.preallocate,
        )

    @property
    def capacity(self) -> int:
        """Rows allocated now (``memory_size + 1`` once full)."""
        return 0 if self.targets is None else self.targets.shape[0]

    @property
    def inputs(self) -> NestedTensors | None:
        """The input columns (all allocated rows) in the stored structure; None while empty."""
        if self.structure is None:
            return None
        if self.structure == "tensor":
            return self.columns[""]
        return nested.unflatten(self.structure, self.columns)

    def _pad(self, path: str) -> float:
        return self.pad_values.get(path, 0)

    # ----------------------------------------------------------------------------- storage
    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float = 0) -> Tensor:
        return torch.full(shape, fill, dtype=dtype, device=self.storage_device, pin_memory=self._pin)

    def _rows_for(self, rows: int, current: int | None = None) -> int:
        """The capacity to hold ``rows`` rows: geometric growth from INITIAL_ROWS (or from the
        ``current`` capacity, by default this memory's), capped at M + 1."""
        cap = self.memory_size + 1
        if self.preallocate:
            return cap
        new = max(self.capacity if current is None else current, min(INITIAL_ROWS, cap))
        while new < rows:
            new = min(2 * new, cap)
        return new

    def _ensure_rows(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        new_rows, filled = self._rows_for(rows), len(self)

        def grow(column: Tensor, fill: float) -> Tensor:
            out = self._alloc((new_rows, *column.shape[1:]), column.dtype, fill)
            out[:filled] = column[:filled]
            return out

        self.columns = {p: grow(c, self._pad(p)) for p, c in self.columns.items()}
        assert self.targets is not None
        self.targets = grow(self.targets, 0)
        self.metadata = {name: grow(c, 0) for name, c in self.metadata.items()}

    def _grow_leaf(self, path: str, shape: tuple[int, ...]) -> None:
        """Widens column ``path`` to per-item ``shape`` (each dim >= the current), padding with its value."""
        column = self.columns[path]
        out = self._alloc((column.shape[0], *shape), column.dtype, self._pad(path))
        out[(slice(None), *(slice(0, s) for s in column.shape[1:]))] = column
        self.columns[path] = out

    def _start(self, flat: dict[str, Tensor], struct: Any, metadata: dict[str, Tensor]) -> None:
        rows = self._rows_for(1)
        for path, leaf in flat.items():
            _check_pad_fits(path, self._pad(path), leaf.dtype)
            self.columns[path] = self._alloc((rows, *leaf.shape[1:]), leaf.dtype, self._pad(path))
        self.targets = self._alloc((rows,), torch.int64)
        self.metadata = {name: self._alloc((rows, *v.shape[1:]), v.dtype) for name, v in metadata.items()}
        self.structure = struct

    # ----------------------------------------------------------------------------- writing
    def _check_batch(
        self, flat: dict[str, Tensor], struct: Any, n: int, targets: Tensor, metadata: dict[str, Tensor]
    ) -> None:
        if not isinstance(targets, Tensor) or targets.dim() != 1:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a 1-D tensor of class indices, got shape {shape}")
        if targets.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
        if targets.shape[0] != n or any(v.shape[0] != n for v in metadata.values()):
            raise ValueError("inputs, targets and metadata must have the same number of items")
        if self.structure is None:
            return
        if struct != self.structure:
            raise ValueError(f"memory holds inputs structured as {self.structure}, got {struct}")
        for path, leaf in flat.items():
            column = self.columns[path]
            if leaf.dtype != column.dtype:
                raise ValueError(f"memory holds {_where(path)} of dtype {column.dtype}, got {leaf.dtype}")
            if leaf.dim() != column.dim():
                raise ValueError(
                    f"memory holds {_where(path)} of per-item shape {tuple(column.shape[1:])}, "
                    f"got {tuple(leaf.shape[1:])} (a different number of dims)"
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
        device = self.storage_device
        if start + n <= M:
            return torch.arange(start, start + n, device=device)
        # Few tensor ops on purpose: this runs at every training step.
        order = self._orders.get(n)
        if order is None:
            order = self._orders[n] = torch.arange(n, device=device)
        t = torch.arange(start + 1, start + n + 1, dtype=torch.float64, device=device)  # 1-based positions
        u = torch.rand(n, dtype=torch.float64, device=device, generator=self.generator)
        slots = u.mul_(t).long()  # uniform in {0, ..., t-1}: truncation is floor as u * t >= 0
        if start < M:  # the memory fills up within this batch
            slots = torch.where(t <= M, order + start, slots)
        slots.clamp_(max=M)
        # Later items win a slot they share with earlier ones, as in the sequential algorithm.
        if self._last_writer is None:
            self._last_writer = torch.empty(M + 1, dtype=torch.long, device=device)
        last_writer = self._last_writer  # include_self=False: only the entries written here are read
        last_writer.scatter_reduce_(0, slots, order, reduce="amax", include_self=False)
        return slots.masked_fill_(last_writer[slots] != order, M)

    @torch.no_grad()
    def add(self, inputs: NestedTensors, targets: Tensor, metadata: dict[str, Tensor] | None = None) -> Tensor:
        """Offers a batch to the reservoir; returns the slot of each item (``memory_size`` = not kept).

        A refused batch (wrong structure, dtype, number of dims, item counts, metadata) raises
        ValueError and leaves the memory untouched.
        """
        metadata = metadata or {}
        if isinstance(inputs, Tensor) and inputs.dim() > 0:  # the common case, kept cheap: runs every step
            flat, struct, n = {"": inputs}, "tensor", inputs.shape[0]
        else:
            flat, struct, n = nested.flatten(inputs), nested.structure(inputs), nested.batch_size(inputs)
        self._check_batch(flat, struct, n, targets, metadata)
        if self.memory_size == 0 or n == 0:
            self.seen += n
            return torch.full((n,), self.memory_size, dtype=torch.long, device=self.storage_device)
        if self.structure is None:
            self._start(flat, struct, metadata)
        for path, leaf in flat.items():
            have = self.columns[path].shape[1:]
            if leaf.shape[1:] != have and any(a > b for a, b in zip(leaf.shape[1:], have, strict=True)):
                self._grow_leaf(path, tuple(max(a, b) for a, b in zip(leaf.shape[1:], have, strict=True)))
        needed = self.seen + n if self.seen + n <= self.memory_size else self.memory_size + 1
        if needed > self.targets.shape[0]:  # type: ignore[union-attr]
            self._ensure_rows(needed)
        slots = self.reservoir_slots(n)
        storage = self.storage_device
        for path, leaf in flat.items():
            column = self.columns[path]
            leaf = leaf.to(storage)  # add runs without grad: no detach needed
            if leaf.shape[1:] != column.shape[1:]:
                leaf = nested.pad_to(leaf, {"": column.shape[1:]}, {"": self._pad(path)})
            column.index_copy_(0, slots, leaf)
        assert self.targets is not None
        self.targets.index_copy_(0, slots, targets.to(storage, torch.int64))
        for name, value in metadata.items():
            column = self.metadata[name]
            column.index_copy_(0, slots, value.detach().to(storage, column.dtype))
        return slots

    # ----------------------------------------------------------------------------- reading
    def sample(self, batch_size: int) -> MemoryBatch | None:
        """Draws up to ``batch_size`` distinct items uniformly; ``None`` while the memory is empty."""
        filled = len(self)
        if filled == 0 or batch_size <= 0:
            return None
        k = min(batch_size, filled)
        return self._get(sample_without_replacement(filled, k, self.generator, self.storage_device))

    def _gather(self, column: Tensor, indices: Tensor) -> Tensor:
        if not self._host:
            return column[indices]
        if self._pin:  # gather into page-locked memory so that the copy to the device is asynchronous
            out = torch.empty((indices.shape[0], *column.shape[1:]), dtype=column.dtype, pin_memory=True)
            torch.index_select(column, 0, indices, out=out)
            return out.to(self.device, non_blocking=True)
        return column[indices].to(self.device, non_blocking=True)

    def get(self, indices: Tensor) -> MemoryBatch:
        """The items at ``indices``, on the training device, with the buffer transforms applied."""
        if self.targets is None:
            raise ValueError("the memory is empty")
        return self._get(indices.to(self.storage_device))

    def _get(self, indices: Tensor) -> MemoryBatch:
        assert self.targets is not None
        gather = self._gather
        if self.structure == "tensor":
            inputs: NestedTensors = gather(self.columns[""], indices)
        else:
            inputs = nested.unflatten(self.structure, {p: gather(c, indices) for p, c in self.columns.items()})
        targets = gather(self.targets, indices)
        if self.transform is not None:
            inputs = self.transform(inputs)
        if self.target_transform is not None:
            targets = self.target_transform(targets)
        return MemoryBatch(indices, inputs, targets, {k: gather(v, indices) for k, v in self.metadata.items()})

    @torch.no_grad()
    def update_metadata(self, name: str, indices: Tensor, values: Tensor, gamma: float = 0.0) -> None:
        """In place: ``metadata[name][indices] = gamma * old + (1 - gamma) * values``."""
        column = self.metadata[name]
        values = values.detach().to(self.storage_device, column.dtype)
        indices = indices.to(self.storage_device)
        if gamma == 0.0:
            column[indices] = values
        else:
            column[indices] = column[indices].mul_(gamma).add_(values, alpha=1.0 - gamma)

    def set_metadata(self, name: str, values: Tensor) -> None:
        """Creates or replaces a metadata column for all filled slots (e.g. refreshed logits)."""
        filled = len(self)
        if values.shape[0] != filled:
            raise ValueError(f"metadata {name!r} needs {filled} rows, got {values.shape[0]}")
        if self.targets is None:
            return  # nothing stored yet: the column is created by the first write that carries it
        column = self._alloc((self.capacity, *values.shape[1:]), values.dtype)
        column[:filled] = values.detach().to(self.storage_device)
        self.metadata[name] = column

    def raw_items(self) -> tuple[NestedTensors, Tensor, dict[str, Tensor]]:
        """The stored items as they were added (no transforms, padded to the columns' lengths), filled
        slots only, on the storage device."""
        filled = len(self)
        if self.structure is None or self.targets is None:
            raise ValueError("the memory is empty")
        flat = {p: c[:filled] for p, c in self.columns.items()}
        inputs = flat[""] if self.structure == "tensor" else nested.unflatten(self.structure, flat)
        return inputs, self.targets[:filled], {k: v[:filled] for k, v in self.metadata.items()}

    # ----------------------------------------------------------------------------- state
    def state_dict(self, copy: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(JSON description and counters, tensors): the filled slots as contiguous CPU tensors, one per
        input leaf (``inputs`` / ``inputs.<path>``), ``targets``, ``metadata.<name>``, and the RNG state.

        ``copy=False`` returns views of a host-memory column instead of copies (for a writer that
        streams them to disk before the memory changes again); device columns are always copied.
        """
        filled = len(self)

        def out(column: Tensor) -> Tensor:
            part = column[:filled].detach()
            if part.device.type != "cpu":
                return part.cpu().contiguous()
            return part.clone() if copy else part.contiguous()

        tensors: dict[str, Tensor] = {"generator_state": self.generator.get_state().clone()}
        leaves: dict[str, Any] = {}
        if self.structure is not None and self.targets is not None:
            for path, column in self.columns.items():
                tensors[_input_key(path)] = out(column)
                leaves[path] = {"dtype": _dtype_name(column.dtype), "shape": list(column.shape[1:])}
            tensors["targets"] = out(self.targets)
            for name, column in self.metadata.items():
                tensors[f"metadata.{name}"] = out(column)
        meta = {
            "memory_size": self.memory_size,
            "seen": self.seen,
            "metadata_names": sorted(self.metadata),
            "input_structure": self.structure,
            "input_leaves": leaves,
            "pad_values": dict(sorted(self.pad_values.items())),
        }
        return meta, tensors

    def load_state_dict(
        self,
        meta: dict[str, Any],
        tensors: dict[str, Tensor],
        *,
        num_classes: int | None = None,
        required_metadata: dict[str, tuple[int, ...] | None] | None = None,
    ) -> None:
        """Restores a state from ``state_dict``; the restored memory continues exactly as the original.

        Everything is validated before anything changes; a ValueError names the field: the JSON
        fields and their types, counters (``0 <= seen <= int64 max``, ``filled = min(seen,
        memory_size)`` rows in every tensor), unknown or missing tensors, each input leaf's dtype and
        per-item shape against ``input_leaves``, 1-D int64 targets in ``[0, num_classes)``, the
        ``required_metadata`` columns (present, floating point, per-item shape as given unless None),
        finite floating-point values, the generator state, and pad values equal to this memory's.
        States written before nested inputs (no ``input_structure``) load as a single tensor.
        """
        prepared, self._prepared = self._prepared, {}  # dropped whatever happens next
        struct, leaves, pads, names, seen, filled = self._validate_state(meta, tensors, num_classes, required_metadata)
        generator = torch.Generator(device=self.storage_device)
        try:
            generator.set_state(tensors["generator_state"].cpu())
        except RuntimeError:
            raise MemoryStateError(
                f"generator_state ({tensors['generator_state'].numel()} bytes) does not fit a "
                f"{self.storage_device.type} generator",
                in_json=False,
            ) from None
        self.generator = generator
        self.seen = seen
        self.pad_values = pads
        self.structure, self.columns, self.targets, self.metadata = None, {}, None, {}
        self._last_writer = None
        if not filled:
            return
        rows = self._rows_for(filled if seen <= self.memory_size else self.memory_size + 1)


        def column(key: str, fill: float) -> Tensor:
            value = tensors[key]
            full = prepared.get(key)  # the tensor was read straight into this column (see load_buffers)
            if (
                full is not None and full.shape[0] == rows and full.shape[1:] == value.shape[1:]
                and full.dtype == value.dtype and full.data_ptr() == value.data_ptr()
            ):  # fmt: skip
                return full
            out = self._alloc((rows, *value.shape[1:]), value.dtype, fill)
            out[:filled] = value
            return out

        self.columns = {p: column(_input_key(p), pads.get(p, 0)) for p in leaves}
        self.targets = column("targets", 0)
        self.metadata = {n: column(f"metadata.{n}", 0) for n in names}
        self.structure = struct

    def load_buffers(self, meta: Any, header: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, Tensor]:
        """Where to read a state's tensors (``retain.state.StateFolder.tensors(..., into=)``): views
        of the host columns ``load_state_dict`` will adopt, so that loading a memory holds it once,
        not twice. From ``meta`` and the file's header only (names, dtypes, shapes); a tensor whose
        row count is not ``min(seen, memory_size)`` gets no buffer, and ``load_state_dict`` still
        validates everything. Nothing for a memory on an accelerator (read, then copied there)."""
        self._prepared = {}
        seen = meta.get("seen") if isinstance(meta, dict) else None
        if self.storage_device.type != "cpu" or not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
            return {}
        filled = min(seen, self.memory_size)
        if filled == 0:
            return {}
        rows = self._rows_for(filled if seen <= self.memory_size else self.memory_size + 1, current=0)
        out: dict[str, Tensor] = {}
        for key, (dtype, shape) in header.items():
            if key == "generator_state" or not shape or shape[0] != filled:
                continue
            path = key[len("inputs.") :] if key.startswith("inputs.") else ""
            fill = self.pad_values.get(path, 0) if key.startswith("inputs") else 0
            full = self._alloc((rows, *shape[1:]), dtype, fill)
            self._prepared[key] = full
            out[key] = full[:filled]
        return out

    def _validate_state(
        self,
        meta: Any,
        tensors: Any,
        num_classes: int | None,
        required_metadata: dict[str, tuple[int, ...] | None] | None,
    ) -> CheckedState:
        """Checks a memory state against this memory before anything is adopted: the description,
        the inputs' leaves and every column's dtype, shape and values."""
        seen, names, pads = self._check_description(meta)
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise _bad_tensors("tensors must be a dict of tensors")
        state = tensors.get("generator_state")
        if state is None or state.dtype != torch.uint8 or state.dim() != 1:
            raise _bad_tensors("generator_state must be a 1-D uint8 tensor")
        filled = min(seen, self.memory_size)
        struct, paths = _check_inputs(meta, tensors, filled, names)
        if filled:
            _check_columns(tensors, filled, names, num_classes, required_metadata)
        return CheckedState(struct, paths, pads, list(names) if filled else [], seen, filled)

    def _check_description(self, meta: Any) -> tuple[int, list[str], dict[str, float]]:
        """(seen, metadata names, pad values) of ``meta`` (memory.json), checked against this memory."""
        if not isinstance(meta, dict):
            raise _bad_json(f"the description must be a JSON object, got {type(meta).__name__}")
        known = {"memory_size", "seen", "metadata_names", "input_structure", "input_leaves", "pad_values"}
        unknown = sorted(set(meta) - known)
        if unknown:
            raise _bad_json(f"unknown field(s) {unknown}")
        nested_fields = ("input_structure", "input_leaves", "pad_values")
        required = ["memory_size", "seen", "metadata_names"]
        if any(key in meta for key in nested_fields):  # all three, or none (a state before nested inputs)
            required += nested_fields
        for key in required:
            if key not in meta:
                raise _bad_json(f"field {key!r} is missing")
        for key in ("memory_size", "seen"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool):
                raise _bad_json(f"{key} must be an integer, got {meta[key]!r}")
        if meta["memory_size"] != self.memory_size:
            raise _bad_json(
                f"the state holds a memory of size {meta['memory_size']}, this one has memory_size={self.memory_size}"
            )
        seen = meta["seen"]
        if not 0 <= seen <= _MAX_SEEN:
            raise _bad_json(f"seen must lie in [0, 2**53] (float64 positions are exact to there), got {seen}")
        names = meta["metadata_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and _NAME.match(n) for n in names):
            raise _bad_json(f"metadata_names must be a list of identifiers, got {names!r}")
        if names != sorted(set(names)):
            raise _bad_json(f"metadata_names must be sorted and unique, got {names!r}")
        pads = _check_pad_values(meta.get("pad_values", self.pad_values), "memory state: pad_values")
        for path in sorted(set(pads) | set(self.pad_values)):
            if pads.get(path, 0) != self.pad_values.get(path, 0):
                raise _bad_json(
                    f"{_where(path)} was padded with {pads.get(path, 0)!r}, this memory pads it with "
                    f"{self.pad_values.get(path, 0)!r}"
                )
        return seen, names, pads


class CheckedState(NamedTuple):
    """A memory state that passed every check, as ``load_state_dict`` adopts it."""

    structure: Any  # the inputs' structure (None: an empty memory without one)
    paths: list[str]  # the inputs' leaves
    pad_values: dict[str, float]
    metadata_names: list[str]
    seen: int
    filled: int


def _bad_json(message: str) -> MemoryStateError:
    return MemoryStateError(message, in_json=True)


def _bad_tensors(message: str) -> MemoryStateError:
    return MemoryStateError(message, in_json=False)


def _check_inputs(
    meta: dict[str, Any], tensors: dict[str, Tensor], filled: int, names: list[str]
) -> tuple[Any, list[str]]:
    """(structure, leaf paths) of the stored inputs; checks that exactly the expected tensors are
    there and that every input leaf has its described dtype and shape."""
    struct = meta.get("input_structure")
    if struct is None and filled and "inputs" in tensors:
        struct = "tensor"  # a state written before nested inputs
    paths: list[str] = []
    if struct is not None:
        try:
            paths = nested.structure_paths(struct)
        except ValueError as err:
            raise _bad_json(f"input_structure: {err}") from None
    elif filled:
        raise _bad_json("input_structure is missing")
    leaves = meta.get("input_leaves")
    if leaves is None:  # a state written before nested inputs: described by its tensors
        leaves = {}
        for p in paths:
            if _input_key(p) in tensors:
                value = tensors[_input_key(p)]
                leaves[p] = {"dtype": _dtype_name(value.dtype), "shape": list(value.shape[1:])}
    if not isinstance(leaves, dict) or (filled and sorted(leaves) != sorted(paths)):
        described = sorted(leaves) if isinstance(leaves, dict) else leaves
        raise _bad_json(f"input_leaves must describe the leaves {paths}, got {described!r}")
    expected = {"generator_state"}
    if filled:
        expected |= {_input_key(p) for p in paths} | {"targets"} | {f"metadata.{n}" for n in names}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise _bad_tensors(f"unknown tensor(s) {unknown}")
    missing = sorted(expected - set(tensors))
    if missing:
        raise _bad_tensors(f"tensor(s) {missing} missing")
    if not filled:
        return struct, []
    for path in paths:
        key, spec = _input_key(path), leaves[path]
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise _bad_json(f"input_leaves[{path!r}] must be {{'dtype', 'shape'}}, got {spec!r}")
        dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        shape = spec["shape"]
        if dtype is None:
            raise _bad_json(f"input_leaves[{path!r}]: unknown dtype {spec['dtype']!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise _bad_json(f"input_leaves[{path!r}]: shape must be a list of sizes, got {shape!r}")
        value = tensors[key]
        if value.dtype != dtype or tuple(value.shape) != (filled, *shape):
            raise _bad_tensors(
                f"tensor {key!r} is {value.dtype} {tuple(value.shape)}, expected {dtype} {(filled, *shape)}"
            )
    return struct, paths


def _check_columns(
    tensors: dict[str, Tensor],
    filled: int,
    names: list[str],
    num_classes: int | None,
    required_metadata: dict[str, tuple[int, ...] | None] | None,
) -> None:
    """Checks the targets, the metadata columns (those the method needs included) and finiteness."""
    targets = tensors["targets"]
    if targets.dtype != torch.int64 or targets.dim() != 1:
        raise _bad_tensors(f"targets must be a 1-D int64 tensor, got {targets.dtype} {tuple(targets.shape)}")
    if targets.shape[0] != filled:
        raise _bad_tensors(f"tensor 'targets' has {targets.shape[0]} rows, expected {filled}")
    if num_classes and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise _bad_tensors(f"targets must lie in [0, {num_classes - 1}]")
    for name in names:
        value = tensors[f"metadata.{name}"]
        if value.dim() == 0 or value.shape[0] != filled:
            raise _bad_tensors(f"tensor 'metadata.{name}' has shape {tuple(value.shape)}, expected {filled} rows")
    for name, shape in (required_metadata or {}).items():
        if name not in names:
            raise _bad_tensors(f"metadata column {name!r} is missing (the method needs it)")
        value = tensors[f"metadata.{name}"]
        if not value.dtype.is_floating_point:
            raise _bad_tensors(f"metadata column {name!r} must be floating point, got {value.dtype}")
        if shape is not None and tuple(value.shape[1:]) != tuple(shape):
            raise _bad_tensors(
                f"metadata column {name!r} has per-item shape {tuple(value.shape[1:])}, expected {tuple(shape)}"
            )
    for key, value in tensors.items():
        if value.dtype.is_floating_point and not all_finite(value):
            raise _bad_tensors(f"tensor {key!r} contains NaN or Inf")


def _check_pad_values(values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must map input leaf paths to numbers, got {type(values).__name__}")
    out = {}
    for path, value in values.items():
        if not isinstance(path, str):
            raise ValueError(f"{where}: leaf path {path!r} must be a string")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: pad value of {_where(path)} must be a finite number, got {value!r}")
        out[path] = value
    return out


def _check_pad_fits(path: str, value: float, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point and dtype != torch.bool and float(value) != int(value):
        raise ValueError(f"pad value {value!r} of {_where(path)} does not fit its dtype {dtype}")
