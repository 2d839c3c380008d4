"""The lower and upper bounds of every results table: fine-tuning and joint training."""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import retain.nested as nested
from retain.batching import NestedTensorDataset, materialize, unwrap_loader
from retain.learners.base import Checkpoint, Learner, check_joinable
from retain.models.base import ContinualModel
from retain.nested import NestedTensors
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
    """Keeps every item seen and, at each update, re-initialises the model and trains it from
    scratch on all of them: the upper bound.

    This learner HOLDS DATA: every update reads its whole dataset into host memory (nested inputs
    as one tensor per leaf, each padded to the longest item with its ``pad_values`` entry, default
    0) and the state folder stores
    all items seen so far (``learner.safetensors``). Size the data accordingly; the replay
    methods stream.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_inputs: NestedTensors | None = None
        self.seen_targets: Tensor | None = None

    def on_model_update_start(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Any = None,
        val_dataset_collate_fn: Any = None,
        task_id: str | None = None,
    ) -> None:
        dataset, collate_fn, _ = unwrap_loader(train_dataset, train_dataset_collate_fn)
        pads = self.options.pad_values
        inputs, targets = materialize(dataset, collate_fn, pad_values=pads)
        inputs, targets = nested.to_device(inputs, "cpu"), targets.cpu()
        if self.seen_inputs is not None and self.seen_targets is not None:
            check_joinable(inputs, self.seen_inputs)
            inputs = nested.cat([self.seen_inputs, inputs], pads)
            targets = torch.cat([self.seen_targets, targets.to(self.seen_targets.dtype)])
        super().on_model_update_start(
            NestedTensorDataset(inputs, targets), val_dataset, None, val_dataset_collate_fn, task_id
        )
        self.seen_inputs, self.seen_targets = inputs, targets  # kept only once the data passed the checks
        reset_parameters(self.model)

    def on_save_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        structure = ""
        if self.seen_inputs is not None and self.seen_targets is not None:
            if isinstance(self.seen_inputs, Tensor):
                checkpoint["tensors"]["seen_inputs"] = self.seen_inputs
            else:
                structure = json.dumps(nested.structure(self.seen_inputs))
                for path, leaf in nested.leaves(self.seen_inputs):
                    checkpoint["tensors"][f"seen_inputs.{path}"] = leaf
            checkpoint["tensors"]["seen_targets"] = self.seen_targets
        checkpoint["json"]["seen_inputs_structure"] = structure

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        tensors = checkpoint["tensors"]
        structure = checkpoint["json"].get("seen_inputs_structure", "")
        self.seen_targets = tensors.get("seen_targets")
        if structure:
            prefix = "seen_inputs."
            flat = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.seen_inputs = nested.unflatten(json.loads(structure), flat)
        else:
            self.seen_inputs = tensors.get("seen_inputs")


class JointModelUpdater(_BaselineModelUpdater):
    """Joint training on all data seen so far: it holds every item in memory and in the state
    folder (one tensor entry per input leaf plus the targets), see ``JointLearner``."""

    learner_class = JointLearner
