"""Data kept as chunks of tensor files, read by memory map and batched without concatenation.

The joint baseline keeps every item it has seen. Stored as one file per update
(``chunk_000000.safetensors``, ``chunk_000001.safetensors``, ...), a new state reuses the earlier
chunks by hard link and writes only its new one, and training reads the old chunks straight from
the page cache through a memory map: an update's save and load cost, and its new disk use,
follow its new data, not all data so far.

- ``map_chunk`` opens a verified chunk file (``retain.state.LinkedFile``) read-only by ``mmap``
  and returns zero-copy tensors over it (``torch.frombuffer``), after checking that the file
  opened is the inode that was verified and that its safetensors header is well-formed.
- ``ChunkedDataset`` is the concatenation of several ``(inputs, targets)`` chunks, indexable
  like a ``TensorDataset``.
- ``ChunkedBatchSource`` yields the batches of one epoch as ``retain.batching.BatchSource``
  does over the concatenated tensors (same permutation from the same generator, so the same
  batches), gathering each batch from the chunks it touches.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from retain.state import LinkedFile, StateError, file_identity, parse_json

CHUNK_KEYS = ("inputs", "targets")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 2**20


def chunk_name(index: int) -> str:
    """The file name of chunk number ``index`` (0-based): ``chunk_000007.safetensors``."""
    return f"chunk_{index:06d}.safetensors"


def map_chunk(source: LinkedFile) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a verified chunk file as tensors over a private memory map.

    Nothing is read here but the header: pages are read when batches touch them. Refuses with a
    ``StateError`` naming the file when the file opened is not the one verified, or when its
    header is malformed or does not hold exactly ``inputs`` and ``targets``.
    """
    path = source.path
    with open(path, "rb") as f:
        if file_identity(os.fstat(f.fileno())) != source.identity:
            raise StateError(f"{path}: the file changed after its checksum was verified")
        size = source.bytes
        if size < 8:
            raise StateError(f"{path}: not a safetensors file (only {size} bytes)")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the file is never written
    (header_len,) = struct.unpack("<Q", mapped[:8])
    if header_len > min(_MAX_HEADER, size - 8):
        raise StateError(f"{path}: invalid safetensors header length {header_len}")
    header = parse_json(bytes(mapped[8 : 8 + header_len]), path)
    if not isinstance(header, dict):
        raise StateError(f"{path}: the safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    if sorted(header) != sorted(CHUNK_KEYS):
        raise StateError(f"{path}: a data chunk holds exactly the tensors {list(CHUNK_KEYS)}, found {sorted(header)}")
    base, data_len = 8 + header_len, size - 8 - header_len
    out = []
    for key in CHUNK_KEYS:
        info = header[key]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise StateError(f"{path}: tensor {key!r} must have dtype, shape and data_offsets")
        dtype, shape, offsets = _DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if dtype is None or not valid_shape or not valid_offsets:
            raise StateError(f"{path}: tensor {key!r} has an invalid dtype, shape or data_offsets")
        begin, end = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = math.prod(shape)
        if not 0 <= begin <= end <= data_len or end - begin != count * itemsize:
            raise StateError(f"{path}: tensor {key!r} lies outside the file or does not match its shape")
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:  # unaligned: copy (only ever the small targets)
            tensor = torch.frombuffer(bytearray(mapped[base + begin : base + end]), dtype=dtype).reshape(shape)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tensor = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        out.append(tensor)
    inputs, targets = out
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise StateError(f"{path}: targets must be a 1-D integer tensor, got {targets.dtype} {tuple(targets.shape)}")
    if inputs.dim() < 1 or inputs.shape[0] != targets.shape[0]:
        raise StateError(f"{path}: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in length")
    return inputs, targets


class ChunkedDataset(Dataset):
    """The concatenation of ``(inputs, targets)`` chunks with the same per-item shape and dtypes."""

    def __init__(self, chunks: Sequence[tuple[Tensor, Tensor]]) -> None:
        if not chunks:
            raise ValueError("a chunked dataset needs at least one chunk")
        first_x, first_y = chunks[0]
        for x, y in chunks:
            if x.shape[1:] != first_x.shape[1:] or x.dtype != first_x.dtype or y.dtype != first_y.dtype:
                raise ValueError(
                    f"chunks differ: {x.dtype} {tuple(x.shape[1:])} / {y.dtype} vs "
                    f"{first_x.dtype} {tuple(first_x.shape[1:])} / {first_y.dtype}"
                )
        self.chunks = list(chunks)
        sizes = torch.tensor([len(y) for _, y in self.chunks], dtype=torch.long)
        self.starts = torch.cumsum(sizes, 0) - sizes  # first global index of each chunk
        self.targets = torch.cat([y for _, y in self.chunks])  # small: kept whole (class masks, devices)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        c = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        return self.chunks[c][0][index - int(self.starts[c])], self.targets[index]

    def gather_inputs(self, index: Tensor) -> Tensor:
        """``inputs[index]`` of the concatenation (a new tensor), read from the chunks it touches."""
        grouped, slot = self.gather_grouped(index)
        return grouped if slot is None else grouped[slot]

    def gather_grouped(self, index: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The rows ``inputs[index]`` grouped by chunk (one ``index_select`` per chunk touched, into
        ``out`` when it has the right shape), and ``slot``: item ``i`` is row ``slot[i]`` (``None``
        when the rows are already in the order of ``index``)."""
        if len(self.chunks) == 1:
            return self.chunks[0][0][index], None
        which = torch.searchsorted(self.starts, index, right=True) - 1
        order = torch.argsort(which, stable=True)
        local = (index - self.starts[which])[order]
        counts = torch.bincount(which, minlength=len(self.chunks)).tolist()
        first = self.chunks[0][0]
        shape = (index.shape[0], *first.shape[1:])
        if out is None or out.shape != shape or out.dtype != first.dtype:
            out = torch.empty(shape, dtype=first.dtype)
        position = 0
        for c, part in enumerate(local.split(counts)):
            if counts[c]:
                torch.index_select(self.chunks[c][0], 0, part, out=out[position : position + counts[c]])
                position += counts[c]
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.shape[0])
        return out, slot


class ChunkedBatchSource:
    """The batches of one epoch over a ``ChunkedDataset`` (optionally a subset of its items), on
    ``device``: the same batches as ``retain.batching.BatchSource`` over the concatenated tensors
    with the same generator. Inputs are gathered from the chunks (never concatenated) a window of
    batches at a time (``WINDOW_BYTES``); targets, which are small, are moved to the device once."""

    collate_fn = None
    tensors = None  # not one pair of tensors: checks use ``first_batch``
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

    def __len__(self) -> int:
        n = int(self._targets.shape[0])
        return (n + self.batch_size - 1) // self.batch_size

    def _batch(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        items = positions if self.indices is None else self.indices[positions]
        inputs = self.dataset.gather_inputs(items).to(self.device, non_blocking=True)
        return inputs, self._targets[positions.to(self._targets.device)]

    def first_batch(self) -> tuple[Tensor, Tensor]:
        """The first ``batch_size`` items in order, on the device, without drawing from the generator."""
        return self._batch(torch.arange(min(self.batch_size, int(self._targets.shape[0]))))

    def _window(self) -> int:
        """Items gathered at once: whole batches filling about ``WINDOW_BYTES`` (at least one batch),
        so that the per-chunk cost of a gather is paid once per window, not once per batch."""
        first = self.dataset.chunks[0][0]
        item_bytes = max(1, first[:1].numel() * first.element_size())
        return max(1, self.WINDOW_BYTES // item_bytes // self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = int(self._targets.shape[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        window = self._window()
        buffer: Tensor | None = None  # reused: batches are copies out of it
        on_cpu = self.device.type == "cpu"
        if len(self.dataset.chunks) == 1:  # one chunk: each batch is one index into it
            for start in range(0, n, self.batch_size):
                yield self._batch(order[start : start + self.batch_size])
            return
        for begin in range(0, n, window):
            positions = order[begin : begin + window]
            items = positions if self.indices is None else self.indices[positions]
            grouped, slot = self.dataset.gather_grouped(items, buffer if on_cpu else None)
            assert slot is not None
            buffer = grouped
            if not on_cpu:
                grouped, slot = grouped.to(self.device, non_blocking=True), slot.to(self.device)
            targets = self._targets[positions.to(self._targets.device)]
            for start in range(0, positions.shape[0], self.batch_size):
                stop = start + self.batch_size
                yield grouped[slot[start:stop]], targets[start:stop]
