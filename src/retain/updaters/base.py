"""Model updaters: one call of ``update`` = one continual-learning update, state folder in and out.

``ModelUpdater(model, ..., input_state_folder=A, output_state_folder=B).update(train, val)``
restores the model, the learner (counters, random generators, component state) and the memory
from A, trains, and writes the whole state to B atomically. Each update can thus run in its own
process or job, and continues exactly where the previous one stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import retain
from retain.learners.base import Learner, model_device, new_checkpoint
from retain.models.base import ContinualModel
from retain.options import TrainingOptions
from retain.state import StateError, StateFolder, lock_output_folder, write_state
from retain.updaters.loop import FitResult, fit


def resolve_device(accelerator: str, devices: int | None) -> torch.device:
    """The training device for the spec's ``accelerator`` ('auto', 'cpu', 'gpu'/'cuda', 'mps')."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"accelerator={accelerator!r} was asked for, but no CUDA GPU is available")
        return torch.device("cuda")
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeError("accelerator='mps' was asked for, but MPS is not available")
        return torch.device("mps")
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_update(seed: int, updates_done: int) -> None:
    """Seeds the global generators (dropout, initialisation) for update number ``updates_done``."""
    torch.manual_seed(seed * 1_000_003 + updates_done)


class ModelUpdater:
    """Base updater: restores state, runs ``_train`` between the learner's update hooks, saves state.

    ``learner_kwargs`` holds the method's own options (memory size, alpha, ...); the common
    training options are keyword arguments (see ``TrainingOptions``).
    """

    def __init__(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | Callable | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        learner_class: type[Learner] = Learner,
        learner_kwargs: dict[str, Any] | None = None,
        input_state_folder: str | Path | None = None,
        output_state_folder: str | Path | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, ContinualModel):
            raise TypeError(f"model must be a retain ContinualModel (RenateModule), got {type(model).__name__}")
        self.options = TrainingOptions.from_kwargs(type(self).__name__, **options)
        self.input_state_folder = Path(input_state_folder) if input_state_folder is not None else None
        self.output_state_folder = Path(output_state_folder) if output_state_folder is not None else None
        self.learner_kwargs = dict(learner_kwargs or {})
        self.device = resolve_device(self.options.accelerator, self.options.devices)
        self.model = model.to(self.device)
        self._state: StateFolder | None = None
        if self.input_state_folder is not None:
            self._state = StateFolder(self.input_state_folder)
            self._check_state_matches(self._state)
            self._load_model_weights(self._state)
        self.learner = learner_class(
            model=self.model, loss_fn=loss_fn, optimizer=optimizer, options=self.options, **self.learner_kwargs
        )
        if self._state is not None:
            self._load_learner_state(self._state)
        self.last_fit: FitResult | None = None

    # ------------------------------------------------------------------ state in
    @property
    def method_name(self) -> str:
        return type(self).__name__

    def _check_state_matches(self, state: StateFolder) -> None:
        m = state.manifest
        if m["method"] != self.method_name:
            raise StateError(
                f"{state.path} was written by {m['method']}, not {self.method_name}: continue it with the same method"
            )
        saved, mine = m["model"], self.model.describe()
        if saved["class"] != mine["class"] or saved["hyperparameters"] != mine["hyperparameters"]:
            raise StateError(
                f"{state.path} holds a {saved['class']} with hyperparameters {saved['hyperparameters']}, "
                f"but the model given is a {mine['class']} with {mine['hyperparameters']}"
            )

    def _load_model_weights(self, state: StateFolder) -> None:
        for task_id in state.manifest["model"]["task_ids"]:
            self.model.add_task_params(task_id)
        weights = state.tensors("model.safetensors")
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise StateError(f"{state.path / 'model.safetensors'} does not fit the model: {err}") from None

    def _load_learner_state(self, state: StateFolder) -> None:
        checkpoint = {"json": state.json("learner.json"), "tensors": state.tensors("learner.safetensors")}
        try:
            self.learner.on_load_checkpoint(checkpoint)
            memory = self.learner.memory_for_state()
            if memory is not None:
                memory.load_state_dict(state.json("memory.json"), state.tensors("memory.safetensors"))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise StateError(
                f"{state.path}: learner or memory state does not fit {self.method_name}: {err!r}"
            ) from None

    # ------------------------------------------------------------------ the update
    def update(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        train_dataset_collate_fn: Callable | None = None,
        val_dataset_collate_fn: Callable | None = None,
        task_id: str | None = None,
    ) -> ContinualModel:
        """Trains on ``train_dataset`` and returns the model to predict with."""
        lock = lock_output_folder(self.output_state_folder) if self.output_state_folder else contextlib.nullcontext()
        with lock, _deterministic(self.options.deterministic_trainer):
            seed_update(self.learner.seed, self.learner.updates_done)
            self.learner.on_model_update_start(
                train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
            )
            self.last_fit = self._train()
            self.learner.on_model_update_end()
            if self.output_state_folder is not None:
                self.save_state(self.output_state_folder)
        return self.learner.inference_model()

    def _train(self) -> FitResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ state out
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.learner_kwargs.items() if v is None or isinstance(v, bool | int | float | str)}

    def save_state(self, folder: str | Path) -> Path:
        """Writes the full continual state to ``folder`` (atomically)."""
        checkpoint = new_checkpoint()
        self.learner.on_save_checkpoint(checkpoint)
        served = self.learner.inference_model()
        manifest = {
            "retain_version": retain.__version__,
            "method": self.method_name,
            "model": served.describe(),
            "method_options": self.method_options(),
            "options": self.options.describe(),
            "updates_done": self.learner.updates_done,
            "task_ids_seen": list(self.learner.task_ids_seen),
        }
        json_files: dict[str, Any] = {"learner.json": checkpoint["json"]}
        tensor_files = {
            "model.safetensors": {k: v.clone() for k, v in served.state_dict().items()},
            "learner.safetensors": {k: v.clone() for k, v in checkpoint["tensors"].items()},
        }
        memory = self.learner.memory_for_state()
        if memory is not None:
            json_files["memory.json"], tensor_files["memory.safetensors"] = memory.state_dict()
        return write_state(folder, manifest, json_files, tensor_files)


class SingleTrainingLoopUpdater(ModelUpdater):
    """An updater whose update is one training loop of ``max_epochs`` epochs."""

    def _train(self) -> FitResult:
        return fit(self.learner, description=f"{self.method_name} task {self.learner.task_id}")


@contextlib.contextmanager
def _deterministic(enabled: bool):
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def load_model(state_folder: str | Path) -> ContinualModel:
    """The model to predict with from a state folder, rebuilt from its registry entry (no pickle)."""
    from retain.models.base import rebuild_model

    state = StateFolder(state_folder)
    model = rebuild_model(state.manifest["model"])
    try:
        model.load_state_dict(state.tensors("model.safetensors"), strict=True)
    except RuntimeError as err:
        raise StateError(f"{state.path / 'model.safetensors'} does not fit the recorded model: {err}") from None
    return model.eval()


__all__ = ["ModelUpdater", "SingleTrainingLoopUpdater", "load_model", "model_device", "resolve_device"]
