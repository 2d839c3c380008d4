"""Data kept as chunks of tensor files, read by memory map and batched without concatenation.

The joint baseline keeps every item it has seen. Stored as one file per update
(``chunk_000000.safetensors``, ``chunk_000001.safetensors``, ...), a new state reuses the earlier
chunks by hard link and writes only its new one, and training reads the old chunks straight from
the page cache through a memory map: an update's save and load cost, and its new disk use,
follow its new data, not all data so far.

A chunk file holds ``targets`` and the inputs, nested (``retain.nested``) as one tensor per leaf:
``inputs`` for a bare tensor, ``inputs.<leaf path>`` otherwise (the names the memory's state uses);
the structure that rebuilds them is kept beside the chunks (the joint learner's ``learner.json``).
Each chunk's variable-length leaves are padded to that chunk's longest item only; batches over
several chunks pad each leaf to the longest chunk's length with the leaf's pad value, exactly as
``nested.cat`` of all chunks would.

- ``map_chunk`` opens a verified chunk file (``retain.state.LinkedFile``) read-only by ``mmap``
  and returns zero-copy tensors over it (``torch.frombuffer``), after checking that the file
  opened is the inode that was verified and that its safetensors header is well-formed (parsed by
  ``retain.state.read_safetensors_header``, the one parser of state files).
- ``ChunkedDataset`` is the concatenation of several ``(inputs, targets)`` chunks, indexable
  like a ``NestedTensorDataset`` of ``nested.cat`` of them.
- ``ChunkedBatchSource`` yields the batches of one epoch as ``retain.batching.BatchSource``
  does over the concatenated tensors (same permutation from the same generator, so the same
  batches), gathering each batch from the chunks it touches.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

import retain.nested as nested
from retain.nested import NestedTensors
from retain.state import LinkedFile, StateError, file_identity, open_regular, read_safetensors_header

TARGETS = "targets"
TENSOR = "tensor"  # the structure of a bare input tensor (``nested.structure`` of a Tensor)


def chunk_name(index: int) -> str:
    """The file name of chunk number ``index`` (0-based): ``chunk_000007.safetensors``."""
    return f"chunk_{index:06d}.safetensors"


def input_key(path: str) -> str:
    """The tensor name of input leaf ``path`` in a chunk file: ``inputs`` or ``inputs.<path>``."""
    return f"inputs.{path}" if path else "inputs"


def chunk_keys(structure: Any) -> list[str]:
    """The tensor names of a chunk whose inputs have ``structure``: one per leaf, then ``targets``."""
    return [*(input_key(p) for p in nested.structure_paths(structure)), TARGETS]


def chunk_tensors(inputs: NestedTensors, targets: Tensor) -> dict[str, Tensor]:
    """The tensors of the chunk file holding ``inputs`` (nested) and ``targets``."""
    out = {input_key(path): leaf for path, leaf in nested.leaves(inputs)}
    out[TARGETS] = targets
    return out


def own_contiguous(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor owning exactly its storage (not a view of a larger one, which
    would be written whole, see the pitfall of saving views)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def chunk_files(
    names: Sequence[str], chunks: Sequence[tuple[NestedTensors, Tensor]], sources: Sequence[LinkedFile | None]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, LinkedFile]]:
    """The chunks for a state folder: those read from a file as linked files (``write_state``
    links them and refuses one whose file was altered since it was verified), the others (a new
    chunk, or one whose file was deleted since it was mapped) as tensors to write."""
    tensors: dict[str, dict[str, Tensor]] = {}
    linked: dict[str, LinkedFile] = {}
    for name, (x, y), source in zip(names, chunks, sources, strict=True):
        if source is not None and source.path.exists():
            linked[name] = source
        else:
            tensors[name] = chunk_tensors(x, y)
    return tensors, linked


def written_file(folder: Path, name: str, manifest: dict[str, Any]) -> LinkedFile:
    """The chunk ``name`` just written into ``folder``, as the linked file later states reuse."""
    path = folder / name
    entry = manifest["files"][name]
    return LinkedFile(path, entry["sha256"], entry["bytes"], file_identity(os.stat(path)))


def map_chunk(source: LinkedFile, structure: Any = TENSOR) -> tuple[NestedTensors, Tensor]:
    """``(inputs, targets)`` of a verified chunk file as tensors over a private memory map, the
    inputs rebuilt in ``structure`` (``nested.structure`` of the inputs; a bare tensor by default).

    Nothing is read here but the header: pages are read when batches touch them. Refuses with a
    ``StateError`` naming the file when the file opened is not the one verified, or when its
    header is malformed or does not hold exactly the tensors of ``structure`` and ``targets``.
    """
    path = source.path
    f, size = open_regular(path)
    with f:
        if file_identity(os.fstat(f.fileno())) != source.identity:
            raise StateError(f"{path}: the file changed after its checksum was verified")
        head, entries = read_safetensors_header(f, size, path)
        expected = chunk_keys(structure)
        if sorted(entries) != sorted(expected):
            raise StateError(f"{path}: a data chunk holds exactly the tensors {expected}, found {sorted(entries)}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never written
    base = len(head)
    tensors: dict[str, Tensor] = {}
    for key, (dtype, shape, begin, end) in entries.items():
        itemsize = dtype.itemsize
        count = math.prod(shape)
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:  # unaligned (not written by retain): copied
            tensor = torch.frombuffer(bytearray(mapped[base + begin : base + end]), dtype=dtype).reshape(shape)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "non-writable buffer": ACCESS_COPY is writable, privately
                tensor = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        tensors[key] = tensor
    targets = tensors.pop(TARGETS)
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise StateError(f"{path}: targets must be a 1-D integer tensor, got {targets.dtype} {tuple(targets.shape)}")
    for key, leaf in tensors.items():
        if leaf.dim() < 1 or leaf.shape[0] != targets.shape[0]:
            raise StateError(f"{path}: {key} {tuple(leaf.shape)} and targets {tuple(targets.shape)} differ in length")
    paths = nested.structure_paths(structure)
    inputs = nested.unflatten(structure, {p: tensors[input_key(p)] for p in paths})
    return inputs, targets


class ChunkedDataset(Dataset):
    """The concatenation of ``(inputs, targets)`` chunks of one input structure (per leaf: one
    dtype and number of dims; lengths may differ, padded with ``pad_values[path]``, default 0)."""

    def __init__(
        self, chunks: Sequence[tuple[NestedTensors, Tensor]], pad_values: Mapping[str, float] | None = None
    ) -> None:
        if not chunks:
            raise ValueError("a chunked dataset needs at least one chunk")
        self.structure = nested.structure(chunks[0][0])
        self.paths = nested.structure_paths(self.structure)
        first_y = chunks[0][1]
        self.leaves: dict[str, list[Tensor]] = {p: [] for p in self.paths}
        for i, (x, y) in enumerate(chunks):
            if nested.structure(x) != self.structure:
                raise ValueError(f"chunks differ: chunk {i} has inputs {nested.structure(x)}, chunk 0 {self.structure}")
            if y.dtype != first_y.dtype:
                raise ValueError(f"chunks differ: chunk {i} has {y.dtype} targets, chunk 0 {first_y.dtype}")
            for path, leaf in nested.leaves(x):
                first = self.leaves[path][0] if self.leaves[path] else leaf
                if leaf.dtype != first.dtype or leaf.dim() != first.dim() or leaf.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"chunks differ: inputs{'.' + path if path else ''} of chunk {i} is {leaf.dtype} "
                        f"{tuple(leaf.shape)} for {y.shape[0]} targets, chunk 0 has {first.dtype} {tuple(first.shape)}"
                    )
                self.leaves[path].append(leaf)
        self.chunks = list(chunks)
        pads = pad_values or {}
        self.pad_values = {p: pads.get(p, 0) for p in self.paths}
        # per-item shape of each leaf over all chunks: the longest chunk's, dim by dim
        self.shapes = {
            p: tuple(max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())) for p, ts in self.leaves.items()
        }
        sizes = torch.tensor([len(y) for _, y in self.chunks], dtype=torch.long)
        self.starts = torch.cumsum(sizes, 0) - sizes  # first global index of each chunk
        self.targets = torch.cat([y for _, y in self.chunks])  # small: kept whole (class masks, devices)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[NestedTensors, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return nested.index(self.gather_inputs(torch.tensor([index])), 0), self.targets[index]

    @property
    def item_bytes(self) -> int:
        """Bytes of one item's inputs, every leaf at its padded length."""
        leaves = self.leaves.items()
        return sum(math.prod(self.shapes[p]) * ts[0].element_size() for p, ts in leaves)

    def build(self, flat: Mapping[str, Tensor]) -> NestedTensors:
        """The nested inputs of the structure from ``{leaf path: tensor}``."""
        if self.structure == TENSOR:
            return flat[""]
        return nested.unflatten(self.structure, flat)

    def gather_inputs(self, index: Tensor) -> NestedTensors:
        """``inputs[index]`` of the concatenation (new tensors), read from the chunks it touches."""
        grouped, slot = self.gather_grouped(index)
        return self.build(grouped if slot is None else {p: t[slot] for p, t in grouped.items()})

    def gather_grouped(
        self, index: Tensor, out: Mapping[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per leaf, the rows ``inputs[index]`` grouped by chunk (one ``index_select`` per chunk
        touched, into ``out[path]`` when it has the right shape), padded to the leaf's longest
        length; and ``slot``: item ``i`` is row ``slot[i]`` (``None`` when the rows are already in
        the order of ``index``)."""
        if len(self.chunks) == 1:
            return {p: ts[0][index] for p, ts in self.leaves.items()}, None
        which = torch.searchsorted(self.starts, index, right=True) - 1
        order = torch.argsort(which, stable=True)
        local = (index - self.starts[which])[order]
        counts = torch.bincount(which, minlength=len(self.chunks)).tolist()
        parts = local.split(counts)
        grouped: dict[str, Tensor] = {}
        for path, ts in self.leaves.items():
            shape = (index.shape[0], *self.shapes[path])
            buffer = out.get(path) if out is not None else None
            if buffer is None or buffer.shape != shape or buffer.dtype != ts[0].dtype:
                buffer = torch.empty(shape, dtype=ts[0].dtype)
            position = 0
            for c, part in enumerate(parts):
                if not counts[c]:
                    continue
                rows = buffer[position : position + counts[c]]
                if tuple(ts[c].shape[1:]) == self.shapes[path]:
                    torch.index_select(ts[c], 0, part, out=rows)
                else:  # a shorter chunk: its rows padded at the end of every non-batch dim
                    rows.fill_(self.pad_values[path])
                    rows[(slice(None), *(slice(0, s) for s in ts[c].shape[1:]))] = ts[c][part]
                position += counts[c]
            grouped[path] = buffer
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.shape[0])
        return grouped, slot


class ChunkedBatchSource:
    """The batches of one epoch over a ``ChunkedDataset`` (optionally a subset of its items), on
    ``device``: the same batches as ``retain.batching.BatchSource`` over the concatenated tensors
    with the same generator. Inputs are gathered from the chunks (never concatenated) a window of
    batches at a time (``WINDOW_BYTES``); targets, which are small, are moved to the device once."""

    collate_fn = None
    tensors = None  # not one pair of tensors: checks use ``first_batch``
    is_stream = False
    WINDOW_BYTES = 32 * 2**20

    def __init__(
        self,
        dataset: ChunkedDataset,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        generator: torch.Generator | None = None,
        indices: Tensor | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: an update needs at least one item")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        self.indices = indices.to(torch.long).cpu() if indices is not None else None
        targets = dataset.targets if self.indices is None else dataset.targets[self.indices]
        self._targets = targets.to(device)
        self.num_classes: int | None = None

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n = int(self._targets.shape[0])
        return (n + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        return self.num_batches

    def _to_device(self, flat: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {p: t.to(self.device, non_blocking=True) for p, t in flat.items()}

    def _batch(self, positions: Tensor) -> tuple[NestedTensors, Tensor]:
        items = positions if self.indices is None else self.indices[positions]
        grouped, slot = self.dataset.gather_grouped(items)
        flat = grouped if slot is None else {p: t[slot] for p, t in grouped.items()}
        return self.dataset.build(self._to_device(flat)), self._targets[positions.to(self._targets.device)]

    def first_batch(self) -> tuple[NestedTensors, Tensor]:
        """The first ``batch_size`` items in order, on the device, without drawing from the generator."""
        return self._batch(torch.arange(min(self.batch_size, int(self._targets.shape[0]))))

    def _window(self) -> int:
        """Items gathered at once: whole batches filling about ``WINDOW_BYTES`` (at least one batch),
        so that the per-chunk cost of a gather is paid once per window, not once per batch."""
        item_bytes = max(1, self.dataset.item_bytes)
        return max(1, self.WINDOW_BYTES // item_bytes // self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[tuple[NestedTensors, Tensor]]:
        n = int(self._targets.shape[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if len(self.dataset.chunks) == 1:  # one chunk: each batch is one index into it
            for start in range(0, n, self.batch_size):
                yield self._batch(order[start : start + self.batch_size])
            return
        window = self._window()
        buffers: dict[str, Tensor] | None = None  # reused on the CPU: batches are copies out of it
        on_cpu = self.device.type == "cpu"
        build = self.dataset.build
        for begin in range(0, n, window):
            positions = order[begin : begin + window]
            items = positions if self.indices is None else self.indices[positions]
            grouped, slot = self.dataset.gather_grouped(items, buffers if on_cpu else None)
            assert slot is not None
            buffers = grouped
            if not on_cpu:
                grouped, slot = self._to_device(grouped), slot.to(self.device)
            targets = self._targets[positions.to(self._targets.device)]
            for start in range(0, positions.shape[0], self.batch_size):
                rows = slot[start : start + self.batch_size]
                yield build({p: t[rows] for p, t in grouped.items()}), targets[start : start + self.batch_size]
