"""The lower and upper bounds of every results table: fine-tuning and joint training."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from retain.batching import materialize
from retain.learners.base import Checkpoint, Learner
from retain.models.base import ContinualModel
from retain.options import (
    KEYWORD_ONLY,
    POSITIONAL_OR_KEYWORD,
    TrainingOptions,
    UpdaterArguments,
    install_signature,
    option_docs,
    training_option_parameters,
)
from retain.updaters.base import SingleTrainingLoopUpdater


class _BaselineModelUpdater(SingleTrainingLoopUpdater):
    """The constructor of the memory-free baselines (generated per subclass): the learner class is
    the only difference. ``model, loss_fn, optimizer`` are positional, everything else keyword-only."""

    learner_class: type[Learner] = Learner

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parameters = [
            inspect.Parameter("model", POSITIONAL_OR_KEYWORD, annotation=ContinualModel),
            inspect.Parameter("loss_fn", POSITIONAL_OR_KEYWORD, default=None, annotation="nn.Module | None"),
            inspect.Parameter("optimizer", POSITIONAL_OR_KEYWORD, default=None, annotation="Callable | None"),
            inspect.Parameter("input_state_folder", KEYWORD_ONLY, default=None, annotation="str | Path | None"),
            inspect.Parameter("output_state_folder", KEYWORD_ONLY, default=None, annotation="str | Path | None"),
            *training_option_parameters(),
        ]
        docs = option_docs(UpdaterArguments, TrainingOptions)
        install_signature(cls, parameters, _build_baseline, docs)


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
    """Keeps every item seen (as tensors, saved in the state folder) and, at each update,
    re-initialises the model and trains it from scratch on all of them: the upper bound."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_inputs: Tensor | None = None
        self.seen_targets: Tensor | None = None

    def on_model_update_start(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Any = None,
        val_dataset_collate_fn: Any = None,
        task_id: str | None = None,
    ) -> None:
        inputs, targets = materialize(train_dataset, train_dataset_collate_fn)
        inputs, targets = inputs.cpu(), targets.cpu()
        if self.seen_inputs is not None and self.seen_targets is not None:
            if inputs.shape[1:] != self.seen_inputs.shape[1:]:
                raise ValueError(
                    f"train_dataset: inputs of per-item shape {tuple(inputs.shape[1:])} differ from the "
                    f"{tuple(self.seen_inputs.shape[1:])} of earlier updates"
                )
            inputs = torch.cat([self.seen_inputs, inputs.to(self.seen_inputs.dtype)])
            targets = torch.cat([self.seen_targets, targets.to(self.seen_targets.dtype)])
        super().on_model_update_start(
            TensorDataset(inputs, targets), val_dataset, None, val_dataset_collate_fn, task_id
        )
        self.seen_inputs, self.seen_targets = inputs, targets  # kept only once the data passed the checks
        reset_parameters(self.model)

    def on_save_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.seen_inputs is not None and self.seen_targets is not None:
            checkpoint["tensors"]["seen_inputs"] = self.seen_inputs
            checkpoint["tensors"]["seen_targets"] = self.seen_targets

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.seen_inputs = checkpoint["tensors"].get("seen_inputs")
        self.seen_targets = checkpoint["tensors"].get("seen_targets")


class JointModelUpdater(_BaselineModelUpdater):
    """Joint training on all data seen so far (kept in the state folder as two tensor entries)."""

    learner_class = JointLearner
