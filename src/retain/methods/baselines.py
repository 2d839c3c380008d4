"""The lower and upper bounds of every results table: fine-tuning and joint training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from retain.batching import materialize
from retain.chunks import ChunkedBatchSource, ChunkedDataset, chunk_name, map_chunk
from retain.learners.base import Checkpoint, Learner
from retain.models.base import ContinualModel
from retain.state import (
    MANIFEST,
    LinkedFile,
    StateError,
    StateFolder,
    file_identity,
    is_mapped_file,
    parse_json,
    write_state,
)
from retain.updaters.base import SingleTrainingLoopUpdater


class _BaselineModelUpdater(SingleTrainingLoopUpdater):
    """The constructor of the memory-free baselines: the learner class is the only difference."""

    learner_class: type[Learner] = Learner

    def __init__(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | None = None,
        optimizer: Any = None,
        input_state_folder: Any = None,
        output_state_folder: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            optimizer,
            learner_class=self.learner_class,
            input_state_folder=input_state_folder,
            output_state_folder=output_state_folder,
            **options,
        )


class FineTuningModelUpdater(_BaselineModelUpdater):
    """Trains on each new chunk alone, with no memory: the lower bound (it forgets)."""

    learner_class = Learner


def reset_parameters(model: nn.Module) -> None:
    """Re-initialises the model as a fresh one would be (draws from the global generator)."""
    if isinstance(model, ContinualModel):
        model.reset_parameters()
        return
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class JointLearner(Learner):
    """Keeps every item seen and, at each update, re-initialises the model and trains it from
    scratch on all of them: the upper bound.

    The data is kept as one chunk per update (see ``retain.chunks``): the chunks of earlier
    updates are memory-mapped from the input state folder, the new one is held in memory until
    the state is written, and batches are gathered from the chunks, so no update concatenates
    or rewrites the data of the earlier ones.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks: list[tuple[Tensor, Tensor]] = []  # (inputs, targets) per update, in update order
        self.chunk_sources: list[LinkedFile | None] = []  # the verified file holding each chunk, if any
        self.loaded_chunk_names: list[str] = []

    @property
    def chunk_names(self) -> list[str]:
        return [chunk_name(i) for i in range(len(self.chunks))]

    @property
    def seen_inputs(self) -> Tensor | None:
        """All inputs kept so far, concatenated (a copy of all data: for inspection, not training)."""
        return torch.cat([x for x, _ in self.chunks]) if self.chunks else None

    @property
    def seen_targets(self) -> Tensor | None:
        """All targets kept so far, concatenated."""
        return torch.cat([y for _, y in self.chunks]) if self.chunks else None

    def on_model_update_start(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Any = None,
        val_dataset_collate_fn: Any = None,
        task_id: str | None = None,
    ) -> None:
        # One chunk per update done: drop the chunk of an earlier attempt of this update that
        # passed the checks but did not finish (e.g. its loss became NaN).
        del self.chunks[self.updates_done :], self.chunk_sources[self.updates_done :]
        inputs, targets = materialize(train_dataset, train_dataset_collate_fn)
        inputs, targets = inputs.detach().cpu(), targets.detach().cpu()
        if self.chunks:
            first_x, first_y = self.chunks[0]
            if inputs.shape[1:] != first_x.shape[1:]:
                raise ValueError(
                    f"train_dataset: inputs of per-item shape {tuple(inputs.shape[1:])} differ from the "
                    f"{tuple(first_x.shape[1:])} of earlier updates"
                )
            inputs, targets = inputs.to(first_x.dtype), targets.to(first_y.dtype)
        inputs, targets = _own_contiguous(inputs), _own_contiguous(targets)
        # The checks (labels, NaN, shape against the model) run on the new data; the earlier
        # chunks passed them in their own updates and are verified by checksum.
        super().on_model_update_start(
            TensorDataset(inputs, targets), val_dataset, None, val_dataset_collate_fn, task_id
        )
        self.chunks.append((inputs, targets))  # kept only once the data passed the checks
        self.chunk_sources.append(None)
        data = ChunkedDataset(self.chunks)
        self._train_source = ChunkedBatchSource(  # type: ignore[assignment]
            data, self.train_batch_size, self.device, shuffle=True, generator=self.generator
        )
        if self.options.mask_unused_classes:
            mask = torch.zeros(self.model.num_outputs, dtype=torch.bool, device=self.device)
            mask[data.targets.unique().to(self.device)] = True
            self._class_mask = mask
        reset_parameters(self.model)

    def use_train_shard(self, indices: Tensor, batch_size: int) -> None:
        source = self.train_dataloader()
        assert isinstance(source, ChunkedBatchSource)
        self._train_source = ChunkedBatchSource(  # type: ignore[assignment]
            source.dataset, batch_size, self.device, shuffle=True, generator=self.generator, indices=indices
        )

    def on_save_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["json"]["chunks"] = self.chunk_names

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.loaded_chunk_names = [str(n) for n in checkpoint["json"]["chunks"]]

    def attach_chunks(self, state: StateFolder) -> None:
        """Maps the chunks that ``learner.json`` of ``state`` lists (after ``on_load_checkpoint``),
        refusing with a StateError naming the file a chunk that is missing, altered or malformed."""
        where = state.path / "learner.json"
        names = self.loaded_chunk_names
        if names != [chunk_name(i) for i in range(len(names))] or len(names) != self.updates_done:
            raise StateError(
                f"{where}: chunks must be {chunk_name(0)} ... one per update done ({self.updates_done}), got {names}"
            )
        listed = sorted(n for n in state.manifest["files"] if is_mapped_file(n))
        if listed != names:
            raise StateError(
                f"{state.path / 'manifest.json'}: the data chunk files {listed} differ from those of "
                f"learner.json {names}"
            )
        chunks: list[tuple[Tensor, Tensor]] = []
        sources: list[LinkedFile | None] = []
        num_classes = int(getattr(self.model, "num_outputs", 0))
        for name in names:
            source = state.mapped_file(name)
            x, y = map_chunk(source)
            if chunks and (x.shape[1:] != chunks[0][0].shape[1:] or x.dtype != chunks[0][0].dtype
                           or y.dtype != chunks[0][1].dtype):  # fmt: skip
                raise StateError(
                    f"{source.path}: {x.dtype} {tuple(x.shape[1:])} / {y.dtype} items differ from the "
                    f"{chunks[0][0].dtype} {tuple(chunks[0][0].shape[1:])} / {chunks[0][1].dtype} of {names[0]}"
                )
            y = y.clone()  # small: read now, right after the checksum, and checked once
            if y.numel() and num_classes and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise StateError(f"{source.path}: targets must lie in [0, {num_classes - 1}]")
            chunks.append((x, y))
            sources.append(source)
        self.chunks, self.chunk_sources = chunks, sources

    def chunk_files(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, LinkedFile]]:
        """The chunks for a state folder: those read from a file as linked files (``write_state``
        links them and refuses one whose file was altered since it was verified), the others (the
        new chunk, or one whose file was deleted since it was mapped) as tensors to write."""
        tensors: dict[str, dict[str, Tensor]] = {}
        linked: dict[str, LinkedFile] = {}
        for name, (x, y), source in zip(self.chunk_names, self.chunks, self.chunk_sources, strict=True):
            if source is not None and source.path.exists():
                linked[name] = source
            else:
                tensors[name] = {"inputs": x, "targets": y}
        return tensors, linked

    def chunks_written(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Records the chunk files just written into ``folder``, so that later states link them."""
        for i, name in enumerate(self.chunk_names):
            if self.chunk_sources[i] is None:
                path = folder / name
                entry = manifest["files"][name]
                self.chunk_sources[i] = LinkedFile(path, entry["sha256"], entry["bytes"], file_identity(os.stat(path)))


def _own_contiguous(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor owning exactly its storage (not a view of a larger one)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


class JointModelUpdater(_BaselineModelUpdater):
    """Joint training on all data seen so far, kept in the state folder as one chunk file per
    update (``chunk_000000.safetensors``, ...) that later states hard-link instead of rewriting."""

    learner_class = JointLearner
    learner: JointLearner

    def _load_learner_state(self, state: StateFolder) -> None:
        super()._load_learner_state(state)
        if self.learner._train_source is not None:
            # An update in progress restores its resume checkpoint: it keeps the chunks it holds
            # (the checkpoint's fingerprint covers the input state and the new data).
            if self.learner.loaded_chunk_names != self.learner.chunk_names:
                raise StateError(
                    f"{state.path / 'learner.json'}: chunks {self.learner.loaded_chunk_names} differ from "
                    f"the update's {self.learner.chunk_names}"
                )
            return
        self.learner.attach_chunks(state)

    def save_state(self, folder: str | Path) -> Path:
        """Writes the state with the new chunk as a file and the earlier ones hard-linked."""
        manifest, json_files, tensor_files = self.state_payload()
        chunk_tensors, linked = self.learner.chunk_files()
        written = write_state(folder, manifest, json_files, {**tensor_files, **chunk_tensors}, linked_files=linked)
        self.learner.chunks_written(written, parse_json((written / MANIFEST).read_bytes(), written / MANIFEST))
        return written
