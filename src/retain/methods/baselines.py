"""The lower and upper bounds of every results table: fine-tuning and joint training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import retain.nested as nested
from retain.batching import NestedTensorDataset, materialize, unwrap_loader
from retain.chunks import (
    ChunkedBatchSource,
    ChunkedDataset,
    chunk_files,
    chunk_name,
    map_chunk,
    own_contiguous,
    written_file,
)
from retain.learners.base import Checkpoint, Learner, check_joinable
from retain.models.base import ContinualModel
from retain.nested import NestedTensors
from retain.options import (
    TrainingOptions,
    UpdaterArguments,
    install_signature,
    model_arguments,
    option_docs,
    state_folder_arguments,
    training_option_parameters,
)
from retain.state import (
    MAPPED_PREFIX,
    LinkedFile,
    MappedVerification,
    StateError,
    StateFolder,
    is_mapped_file,
    parse_json,
    printable,
)
from retain.updaters.base import SingleTrainingLoopUpdater, wants_ddp


class _BaselineModelUpdater(SingleTrainingLoopUpdater):
    """The constructor of the memory-free baselines (generated per subclass): the learner class is
    the only difference. ``model, loss_fn, optimizer`` are positional, everything else keyword-only."""

    learner_class: type[Learner] = Learner

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parameters = [
            *model_arguments(),
            *state_folder_arguments(),
            *training_option_parameters(),
        ]
        docs = option_docs(UpdaterArguments, TrainingOptions)
        install_signature(cls, parameters, _build_baseline, docs)


def _outside(targets: Tensor, num_classes: int) -> bool:
    """Whether any of ``targets`` lies outside ``[0, num_classes)``."""
    return bool(targets.numel()) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes)


def _build_baseline(
    self: _BaselineModelUpdater,
    model: ContinualModel,
    loss_fn: nn.Module | None,
    optimizer: Any,
    input_state_folder: Any,
    output_state_folder: Any,
    **options: Any,
) -> None:
    SingleTrainingLoopUpdater.__init__(
        self,
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

    The data is kept as one chunk per update (see ``retain.chunks``): each update's dataset is read
    into host memory once (nested inputs as one tensor per leaf, each padded to the update's
    longest item with its pad value, ``pad_values``), the chunks of earlier updates are
    memory-mapped from the input state folder, and batches are gathered from the chunks (leaves
    padded to the longest chunk's length), so no update concatenates or rewrites the data of the
    earlier ones. The state folder holds one file per chunk; later states hard-link them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks: list[tuple[NestedTensors, Tensor]] = []  # (inputs, targets) per update, in update order
        self.chunk_sources: list[LinkedFile | None] = []  # the verified file holding each chunk, if any
        self.loaded_chunk_names: list[str] = []
        self.loaded_structure: str = ""  # learner.json's input_structure, as read
        self.loaded_pad_values: str = ""

    @property
    def chunk_names(self) -> list[str]:
        return [chunk_name(i) for i in range(len(self.chunks))]

    @property
    def pad_values(self) -> dict[str, float]:
        """The pad value of each variable-length input leaf (the ``pad_values`` option; others 0)."""
        return dict(self.options.pad_values or {})

    @property
    def input_structure(self) -> str:
        """``nested.structure`` of the inputs as JSON text (``""`` before any data)."""
        return json.dumps(nested.structure(self.chunks[0][0])) if self.chunks else ""

    @property
    def seen_inputs(self) -> NestedTensors | None:
        """All inputs kept so far, concatenated and padded (a copy of all data: for inspection, not training)."""
        return nested.cat([x for x, _ in self.chunks], self.pad_values) if self.chunks else None

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
        dataset, collate_fn, _ = unwrap_loader(train_dataset, train_dataset_collate_fn)
        inputs, targets = materialize(dataset, collate_fn, pad_values=self.pad_values)
        inputs = nested.map_leaves(lambda t: own_contiguous(t.detach().cpu()), inputs)
        targets = own_contiguous(targets.detach().cpu())
        if self.chunks:
            first_x, first_y = self.chunks[0]
            check_joinable(inputs, first_x)
            if nested.structure(inputs) != nested.structure(first_x):
                raise ValueError(
                    f"train_dataset: inputs of structure {nested.structure(inputs)} cannot join the "
                    f"{nested.structure(first_x)} of earlier updates"
                )
            targets = own_contiguous(targets.to(first_y.dtype))
        # The checks (labels, NaN, shape against the model) run on the new data; the earlier
        # chunks passed them in their own updates and are verified by checksum.
        super().on_model_update_start(
            NestedTensorDataset(inputs, targets), val_dataset, None, val_dataset_collate_fn, task_id
        )
        self.chunks.append((inputs, targets))  # kept only once the data passed the checks
        self.chunk_sources.append(None)
        data = ChunkedDataset(self.chunks, self.pad_values)
        self._train_source = ChunkedBatchSource(  # type: ignore[assignment]
            data, self.train_batch_size, self.device, shuffle=True, generator=self.generator
        )
        if self.options.mask_unused_classes and self.options.update_classes is None:
            mask = torch.zeros(self.model.num_outputs, dtype=torch.bool, device=self.device)
            mask[data.targets.unique().to(self.device)] = True  # every class of every chunk
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
        checkpoint["json"]["input_structure"] = self.input_structure
        checkpoint["json"]["pad_values"] = json.dumps(dict(sorted(self.pad_values.items()))) if self.chunks else ""

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.loaded_chunk_names = [str(n) for n in checkpoint["json"]["chunks"]]
        self.loaded_structure = str(checkpoint["json"]["input_structure"])
        self.loaded_pad_values = str(checkpoint["json"]["pad_values"])

    def _loaded_structure(self, where: Path) -> Any:
        """The input structure learner.json records, checked (StateError naming the file)."""
        if not self.loaded_chunk_names:
            if self.loaded_structure or self.loaded_pad_values:
                raise StateError(f"{where}: input_structure and pad_values must be empty without chunks")
            return None
        structure = parse_json(self.loaded_structure.encode(), f"{where} (input_structure)")
        try:
            nested.structure_paths(structure)
        except ValueError as err:
            raise StateError(f"{where}: input_structure: {err}") from None
        pads = json.dumps(dict(sorted(self.pad_values.items())))
        if self.loaded_pad_values != pads:
            raise StateError(
                f"{where}: the chunks were padded with pad_values {printable(self.loaded_pad_values)}, "
                f"this update pads with {pads}"
            )
        return structure

    def attach_chunks(self, state: StateFolder) -> None:
        """Maps the chunks that ``learner.json`` of ``state`` lists (after ``on_load_checkpoint``),
        refusing with a StateError naming the file a chunk that is missing, altered or malformed."""
        where = state.path / "learner.json"
        names = self.loaded_chunk_names
        if names != [chunk_name(i) for i in range(len(names))] or len(names) != self.updates_done:
            raise StateError(
                f"{where}: chunks must be {chunk_name(0)} ... one per update done ({self.updates_done}), "
                f"got {printable(names[:10])}"
            )
        listed = sorted(n for n in state.manifest["files"] if is_mapped_file(n) and n.startswith(MAPPED_PREFIX))
        if listed != names:
            raise StateError(
                f"{state.path / 'manifest.json'}: the data chunk files {printable(listed[:10])} differ from those "
                f"of learner.json {printable(names[:10])}"
            )
        structure = self._loaded_structure(where)
        chunks: list[tuple[NestedTensors, Tensor]] = []
        sources: list[LinkedFile | None] = []
        num_classes = int(getattr(self.model, "num_outputs", 0))
        for name in names:
            source = state.mapped_file(name)
            x, y = map_chunk(source, structure)
            if chunks:
                first_x, first_y = chunks[0]
                for (path, leaf), (_, kept) in zip(nested.leaves(x), nested.leaves(first_x), strict=True):
                    if leaf.dtype != kept.dtype or leaf.dim() != kept.dim():
                        raise StateError(
                            f"{source.path}: inputs{'.' + path if path else ''} {leaf.dtype} {tuple(leaf.shape[1:])} "
                            f"differs from the {kept.dtype} {tuple(kept.shape[1:])} of {names[0]}"
                        )
                if y.dtype != first_y.dtype:
                    raise StateError(f"{source.path}: {y.dtype} targets differ from the {first_y.dtype} of {names[0]}")
            chunks.append((x, y))
            sources.append(source)
        # the targets are small: read now, right after the checksums, in one copy, and checked once
        if chunks:
            targets = torch.cat([y for _, y in chunks])
            if num_classes and _outside(targets, num_classes):  # then name the first chunk that is
                bad = next(s for (_, y), s in zip(chunks, sources, strict=True) if _outside(y, num_classes))
                raise StateError(f"{bad.path}: targets must lie in [0, {num_classes - 1}]")
            ys = torch.split(targets, [len(y) for _, y in chunks])
            chunks = [(x, y) for (x, _), y in zip(chunks, ys, strict=True)]
        self.chunks = chunks
        self.chunk_sources = sources

    def chunk_files(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, LinkedFile]]:
        """The chunks for a state folder: those read from a file as linked files (``write_state``
        links them and refuses one whose file was altered since it was verified), the others (the
        new chunk, or one whose file was deleted since it was mapped) as tensors to write."""
        return chunk_files(self.chunk_names, self.chunks, self.chunk_sources)

    def chunks_written(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Records the chunk files just written into ``folder``, so that later states link them."""
        for i, name in enumerate(self.chunk_names):
            if self.chunk_sources[i] is None:
                self.chunk_sources[i] = written_file(folder, name, manifest)


class JointModelUpdater(_BaselineModelUpdater):
    """Joint training on all data seen so far, kept in the state folder as one chunk file per
    update (``chunk_000000.safetensors``, ...) that later states hard-link instead of rewriting;
    see ``JointLearner``."""

    learner_class = JointLearner
    learner: JointLearner
    # Set False to hash every chunk of the input state at load, before training (the sequential path).
    verify_chunks_in_background = True
    _chunk_check: MappedVerification | None = None

    def _defer_mapped_verification(self) -> bool:
        """The chunks of earlier updates are hashed by a background thread while the update trains
        (``StateFolder.verify_mapped_in_background``), so that a load in a fresh process does not
        read all data first; their sizes and headers are still checked at load. Not with
        in-progress checkpoints (they are written during training) nor multi-process updates."""
        return (
            self.verify_chunks_in_background and not self.options.checkpoint_every_n_epochs
            and not wants_ddp(self.options)
        )  # fmt: skip

    def join_chunk_verification(self) -> None:
        """Waits for the background verification of the input chunks; raises the StateError a load
        would have raised (a chunk altered, naming the file) at every call once one failed."""
        if self._chunk_check is not None:
            self._chunk_check.join()

    def update(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        train_dataset_collate_fn: Any = None,
        val_dataset_collate_fn: Any = None,
        task_id: str | None = None,
    ) -> ContinualModel:
        """Trains on all data so far (see ``ModelUpdater.update``). The input chunks' checksums are
        verified while it trains and joined before the state is written and before it returns: an
        altered chunk raises its StateError and nothing is written."""
        try:
            model = super().update(
                train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
            )
        except BaseException:
            self.join_chunk_verification()  # an altered chunk is the error to report
            raise
        self.join_chunk_verification()
        return model

    def _load_learner_state(self, state: StateFolder) -> None:
        super()._load_learner_state(state)
        if self.learner.has_train_data:
            # An update in progress restores its resume checkpoint: it keeps the chunks it holds
            # (the checkpoint's fingerprint covers the input state and the new data).
            held = (self.learner.chunk_names, self.learner.input_structure)
            if (self.learner.loaded_chunk_names, self.learner.loaded_structure) != held:
                raise StateError(
                    f"{state.path / 'learner.json'}: chunks {printable(self.learner.loaded_chunk_names[:10])} "
                    f"differ from the update's {self.learner.chunk_names[:10]}"
                )
            return
        self.learner.attach_chunks(state)  # headers and sizes checked now, before anything is allocated
        self._chunk_check = state.verify_mapped_in_background()  # nothing to do if they were hashed at load

    def mapped_state_files(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, LinkedFile]]:
        """The data chunks (the new one as a file, the earlier ones hard-linked) and the val chunks."""
        tensors, linked = super().mapped_state_files()
        chunk_files, chunk_links = self.learner.chunk_files()
        return {**tensors, **chunk_files}, {**linked, **chunk_links}

    def mapped_files_written(self, folder: Path, manifest: dict[str, Any]) -> None:
        super().mapped_files_written(folder, manifest)
        self.learner.chunks_written(folder, manifest)

    def save_state(self, folder: str | Path) -> Path:
        """Writes the state once the earlier chunks' checksums are verified (``join_chunk_verification``)."""
        self.join_chunk_verification()
        return super().save_state(folder)
