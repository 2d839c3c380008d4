"""The validation data of every update so far, kept in the state folder (``validation_data='all'``).

The spec's library keeps a buffer of all validation data seen and validates (and early-stops) on
it at every update. Here each update's ``val_dataset`` is stored as one chunk file of the state
folder, ``val_chunk_<update>.safetensors`` (the update number, 0-based, that brought it), in the
chunk format of ``retain.chunks`` (one tensor per input leaf plus ``targets``; nested inputs
padded to that chunk's longest item with ``pad_values``). Later states hard-link the chunks
instead of rewriting them, loads memory-map them, and ``StateFolder`` checksums them like every
other file (an altered or missing chunk is refused there). ``learner.json`` lists the chunks with
the task id of their update and their input structure.

Validation of an update then runs over every stored chunk, batch by batch through the head of the
chunk's own task id (each chunk alone: its batches are never mixed with another chunk's), then over
this update's ``val_dataset`` as given (its own collate function and loader, as without history).
The metrics (loss, accuracy, ``logged_metrics``) are computed over the union of the items.
``validation_data='current'`` validates on this update's ``val_dataset`` only and keeps nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import retain.nested as nested
from retain.batching import BatchSource, as_class_indices, materialize, unwrap_loader
from retain.chunks import (
    ChunkedBatchSource,
    ChunkedDataset,
    chunk_files,
    map_chunk,
    own_contiguous,
    written_file,
)
from retain.nested import NestedTensors
from retain.state import LinkedFile, StateError, StateFolder, parse_json, printable

VAL_CHUNK_PREFIX = "val_chunk_"
_VAL_CHUNK_NAME = re.compile(r"val_chunk_(\d{6,})\.safetensors")
# learner.json keys: parallel lists, one entry per stored chunk
NAMES_KEY, TASK_IDS_KEY, STRUCTURES_KEY = "val_chunks", "val_task_ids", "val_input_structures"
JSON_KEYS = (NAMES_KEY, TASK_IDS_KEY, STRUCTURES_KEY)


def val_chunk_name(update: int) -> str:
    """The file name of the validation chunk of update number ``update`` (0-based)."""
    return f"{VAL_CHUNK_PREFIX}{update:06d}.safetensors"


def is_val_chunk(name: str) -> bool:
    """Whether ``name`` is a validation chunk file of a state folder."""
    return _VAL_CHUNK_NAME.fullmatch(name) is not None


def with_history_keys(learner_json: Any) -> Any:
    """``learner.json`` of a state written before validation chunks existed, given an empty
    history (it loads as a state without stored validation data); other values are returned as they are."""
    if isinstance(learner_json, dict) and not any(k in learner_json for k in JSON_KEYS):
        return {**learner_json, **{k: [] for k in JSON_KEYS}}
    return learner_json


class ValidationBatches:
    """The batches of one validation pass: each part's batches in turn, ``task_id`` naming the head
    of the part being read (``Learner.validation_step`` reads it)."""

    def __init__(self, parts: list[tuple[Any, str]]) -> None:
        self.parts = parts
        self.task_id = parts[0][1] if parts else None

    @property
    def num_batches(self) -> int | None:
        """Batches per pass (``None`` when a part is a stream of unknown length)."""
        counts = [getattr(source, "num_batches", None) for source, _ in self.parts]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]

    def __iter__(self) -> Iterator[tuple[NestedTensors, Tensor]]:
        for source, task_id in self.parts:
            self.task_id = task_id
            yield from source


class ValidationHistory:
    """The stored validation chunks of a learner, one per update that had validation data.

    ``begin_update`` adds this update's val data (kept in host memory until the state is written),
    ``batches`` gives the validation pass over the stored chunks plus the new data, and the state
    methods (``json``, ``load_json``, ``attach``, ``files``, ``written``) save and restore it."""

    def __init__(self, mode: str = "all", pad_values: dict[str, float] | None = None) -> None:
        self.mode = mode
        self.pad_values = dict(pad_values or {})
        self.updates: list[int] = []  # the update number of each chunk, increasing
        self.task_ids: list[str] = []
        self.chunks: list[tuple[NestedTensors, Tensor]] = []
        self.sources: list[LinkedFile | None] = []  # the verified file holding each chunk, if any
        self.loaded: dict[str, list[str]] = {k: [] for k in JSON_KEYS}  # learner.json's lists, as read

    @property
    def keeps(self) -> bool:
        """Whether this learner keeps validation data across updates (``validation_data='all'``)."""
        return self.mode == "all"

    @property
    def names(self) -> list[str]:
        return [val_chunk_name(u) for u in self.updates]

    def __len__(self) -> int:
        return len(self.chunks)

    def structures(self) -> list[str]:
        """``nested.structure`` of each chunk's inputs as JSON text."""
        return [json.dumps(nested.structure(x)) for x, _ in self.chunks]

    def num_items(self, before_update: int | None = None) -> int:
        """Items stored (of the chunks of updates before ``before_update`` when given)."""
        return sum(
            int(y.shape[0]) for u, (_, y) in zip(self.updates, self.chunks, strict=True)
            if before_update is None or u < before_update
        )  # fmt: skip

    # ------------------------------------------------------------------ one update
    def drop_from(self, update: int) -> None:
        """Forgets the chunks of update ``update`` and later (an earlier attempt of this update
        that checked its data but did not finish)."""
        keep = sum(1 for u in self.updates if u < update)
        del self.updates[keep:], self.task_ids[keep:], self.chunks[keep:], self.sources[keep:]

    def begin_update(
        self, update: int, task_id: str, val_dataset: Any, collate_fn: Callable | None = None
    ) -> None:
        """Keeps ``val_dataset`` (read whole into host memory, its leaves padded with
        ``pad_values``) as the chunk of update ``update``; with ``validation_data='current'``
        nothing is kept and the stored history, if any, is forgotten."""
        if not self.keeps:
            self.drop_from(0)
            return
        self.drop_from(update)
        if val_dataset is None:
            return
        dataset, collate_fn, _ = unwrap_loader(val_dataset, collate_fn)
        try:
            inputs, targets = materialize(dataset, collate_fn, pad_values=self.pad_values)
        except ValueError as err:
            raise ValueError(f"val_dataset: {err}") from None
        inputs = nested.map_leaves(lambda t: own_contiguous(t.detach().cpu()), inputs)
        targets = own_contiguous(as_class_indices(targets.detach().cpu().reshape(-1)))
        self.updates.append(update)
        self.task_ids.append(task_id)
        self.chunks.append((inputs, targets))
        self.sources.append(None)

    def batches(
        self, update: int, current: BatchSource | None, current_task_id: str, batch_size: int, device: torch.device
    ) -> ValidationBatches | None:
        """The validation pass of update ``update``: the stored chunks of earlier updates (each
        through its task's head), then ``current`` (this update's val data as given); ``None``
        when there is nothing to validate on."""
        parts: list[tuple[Any, str]] = []
        for u, task_id, chunk in zip(self.updates, self.task_ids, self.chunks, strict=True):
            if u < update and len(chunk[1]):
                source = ChunkedBatchSource(ChunkedDataset([chunk], self.pad_values), batch_size, device, shuffle=False)
                parts.append((source, task_id))
        if current is not None:
            parts.append((current, current_task_id))
        return ValidationBatches(parts) if parts else None

    # ------------------------------------------------------------------ state
    def json(self) -> dict[str, list[str]]:
        """The ``learner.json`` entries of the history (empty lists with ``validation_data='current'``)."""
        if not self.keeps:
            return {k: [] for k in JSON_KEYS}
        return {NAMES_KEY: self.names, TASK_IDS_KEY: list(self.task_ids), STRUCTURES_KEY: self.structures()}

    def load_json(self, learner_json: dict[str, Any]) -> None:
        """Reads the lists of ``learner.json`` (the files are mapped by ``attach``)."""
        self.loaded = {k: [str(v) for v in learner_json[k]] for k in JSON_KEYS}

    def holds_loaded(self) -> bool:
        """Whether the lists read by ``load_json`` describe the chunks held (a resumed update)."""
        return self.loaded == self.json()

    def attach(self, state: StateFolder, updates_done: int, num_classes: int | None, task_ids_seen: list[str]) -> None:
        """Maps the chunks that ``learner.json`` of ``state`` lists (after ``load_json``), refusing
        with a StateError naming the file a list that is inconsistent, a chunk file that is missing
        or not the one listed, or a malformed chunk; the checksums were verified by ``StateFolder``.
        With ``validation_data='current'`` nothing is mapped (the history is not kept)."""
        where = state.path / "learner.json"
        names, task_ids, structures = (self.loaded[k] for k in JSON_KEYS)
        if not len(names) == len(task_ids) == len(structures):
            raise StateError(f"{where}: {', '.join(JSON_KEYS)} must have one entry per validation chunk")
        updates = []
        for name in names:
            match = _VAL_CHUNK_NAME.fullmatch(name)
            if match is None or int(match.group(1)) >= updates_done or (updates and int(match.group(1)) <= updates[-1]):
                raise StateError(
                    f"{where}: val_chunks must name val_chunk_<update>.safetensors files of distinct updates "
                    f"< {updates_done} in increasing order, got {printable(names[:10])}"
                )
            updates.append(int(match.group(1)))
        unknown = sorted(set(task_ids) - set(task_ids_seen))
        if unknown:
            raise StateError(f"{where}: val_task_ids {printable(unknown[:10])} are not among the task ids seen")
        listed = sorted(n for n in state.manifest["files"] if n.startswith(VAL_CHUNK_PREFIX))
        if listed != names:
            raise StateError(
                f"{state.path / 'manifest.json'}: the validation chunk files {printable(listed[:10])} differ from "
                f"those of learner.json {printable(names[:10])}"
            )
        self.drop_from(0)
        if not self.keeps:
            return
        for update, task_id, name, text in zip(updates, task_ids, names, structures, strict=True):
            structure = parse_json(text.encode(), f"{where} (val_input_structures of {name})")
            try:
                nested.structure_paths(structure)
            except ValueError as err:
                raise StateError(f"{where}: val_input_structures of {name}: {err}") from None
            source = state.mapped_file(name)
            x, y = map_chunk(source, structure)
            y = y.clone()  # small: read now, right after the checksum, and checked once
            if y.numel() and num_classes and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise StateError(f"{source.path}: targets must lie in [0, {num_classes - 1}]")
            self.updates.append(update)
            self.task_ids.append(task_id)
            self.chunks.append((x, y))
            self.sources.append(source)

    def files(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, LinkedFile]]:
        """The chunks for a state folder: those read from a file as linked files (``write_state``
        links them, refusing one altered since it was verified), the others as tensors to write."""
        if not self.keeps:
            return {}, {}
        return chunk_files(self.names, self.chunks, self.sources)

    def written(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Records the chunk files just written into ``folder``, so that later states link them."""
        if not self.keeps:
            return
        for i, name in enumerate(self.names):
            if self.sources[i] is None:
                source = written_file(folder, name, manifest)
                # read back by memory map: the host copy of the new val data is freed
                inputs, targets = self.chunks[i]
                self.chunks[i] = (map_chunk(source, nested.structure(inputs))[0], targets)
                self.sources[i] = source


__all__ = [
    "ValidationBatches",
    "ValidationHistory",
    "is_val_chunk",
    "val_chunk_name",
    "with_history_keys",
]
