"""Repeated Distillation (RD), after Deep Model Consolidation (DMC; Zhang et al., WACV 2020).

One update, for new data D and the consolidated model f:

    expert  = fresh copy of f (re-initialised weights, seeded), trained with loss_fn on D alone
    memory.add(D, logits=expert(D))                 # reservoir; old items keep their stored logits
    f       = re-initialised, then trained on the memory ONLY:
              loss = mean over the batch of double_distillation_loss(f(x), stored logits of x)
    memory.logits = f(memory)                       # every stored logit refreshed by the new f
    serve f; discard the expert

Decisions the spec leaves open (kept in the docstrings below): old items keep the logits stored
at the end of the previous update (the previous consolidated model's) while new items get the
expert's, and all are refreshed by the new consolidated model after consolidation;
the validation data (``val_dataset`` and, with ``validation_data='all'``, the stored val data of
earlier updates) scores the consolidated model after every consolidation epoch (the expert is
not validated); the update's ``task_id`` selects the head of both the expert and the
consolidated model; the consolidation phase has its own schedule (``consolidation_epochs``,
``consolidation_batch_size``) because retraining from scratch on a small memory for the
expert's single epoch learns little.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import retain.nested as nested
from retain.batching import (
    BatchSource,
    LoaderOptions,
    NestedTensorDataset,
    dataset_length,
    iter_batches,
    unwrap_loader,
)
from retain.learners.base import Batch, Learner, ReplayLearner, model_device, use_float64
from retain.memory import ReservoirMemory
from retain.methods.baselines import reset_parameters
from retain.models.adapter import forward_logits
from retain.models.base import DEFAULT_TASK_ID, ContinualModel, rebuild_model, registered_models
from retain.nested import NestedTensors
from retain.options import (
    KEYWORD_ONLY,
    POSITIONAL_OR_KEYWORD,
    SEED_STRIDE,
    TrainingOptions,
    UpdaterArguments,
    install_signature,
    model_arguments,
    option_docs,
    state_folder_arguments,
    training_option_parameters,
)
from retain.updaters.base import ModelUpdater, deterministic
from retain.updaters.loop import FitResult, fit

LOGITS = "logits"
_SEED_MODULUS = 2**31 - 1


def double_distillation_loss(predicted_logits: Tensor, target_logits: Tensor) -> Tensor:
    """DMC's double distillation loss per item, shape (B,).

    The targets are normalised per sample by subtracting their mean over the classes (so logits
    of teachers with different offsets are comparable); the loss is
    ``0.5 * mean over classes of (predicted - normalised target)^2``.
    """
    if predicted_logits.shape != target_logits.shape or predicted_logits.dim() != 2:
        raise ValueError(
            "predicted_logits and target_logits must both have shape (B, C), got "
            f"{tuple(predicted_logits.shape)} and {tuple(target_logits.shape)}"
        )
    targets = target_logits - target_logits.mean(dim=1, keepdim=True)
    return 0.5 * (predicted_logits - targets).pow(2).mean(dim=1)


def _input_batches(
    dataset: Dataset | ReservoirMemory,
    batch_size: int,
    collate_fn: Callable | None = None,
    loader_options: LoaderOptions | None = None,
) -> Iterator[NestedTensors]:
    """The raw inputs of every item, in order, in batches (streamed: one batch at a time)."""
    if isinstance(dataset, ReservoirMemory):
        if len(dataset):
            inputs = dataset.raw_items()[0]
            n = nested.batch_size(inputs)
            for start in range(0, n, batch_size):
                yield nested.index(inputs, slice(start, start + batch_size))
        return
    for inputs, _ in iter_batches(dataset, batch_size, collate_fn, options=loader_options, where="dataset"):
        yield inputs


@torch.no_grad()
def extract_logits(
    model: nn.Module,
    dataset: Dataset | DataLoader | ReservoirMemory,
    batch_size: int,
    task_id: str | None = DEFAULT_TASK_ID,
    transform: Callable[[Any], Any] | None = None,
    collate_fn: Callable | None = None,
    loader_options: LoaderOptions | None = None,
) -> Tensor:
    """The logits ``model.get_logits(transform(x), task_id)`` of every item, in order: (N, C).

    ``dataset`` is a ``TensorDataset`` (or ``Subset`` of one), any map-style or iterable
    ``Dataset`` whose items or batches split as ``retain.batching.split_batch`` says (read in
    batches with ``collate_fn``, no shuffling; never held whole), a ``DataLoader`` (its dataset
    and collate function; ``loader_options`` its workers: a stream split between workers comes in
    the workers' order, so read it with the same options as the pass it must line up with), or a
    ``ReservoirMemory`` (its filled slots in slot order; ``transform``
    defaults to the memory's own transform). Inputs may be nested; a plain ``nn.Module`` is
    called with ``retain.nested.call_model``. Runs without gradients on the model's device and in
    eval mode, restoring the model's previous mode. The result is float32 on the model's device.
    """
    if isinstance(dataset, ReservoirMemory) and transform is None:
        transform = dataset.transform
    if isinstance(dataset, DataLoader):
        dataset, collate_fn, loader_options = unwrap_loader(dataset, collate_fn, loader_options)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for inputs in _input_batches(dataset, batch_size, collate_fn, loader_options):
            inputs = nested.to_device(inputs, device)
            if transform is not None:
                inputs = transform(inputs)
            if isinstance(model, ContinualModel):
                chunks.append(model.get_logits(inputs, task_id).float())
            else:
                chunks.append(forward_logits(model, inputs).float())
    finally:
        model.train(was_training)
    if not chunks:
        num_outputs = int(getattr(model, "num_outputs", 0))
        return torch.empty((0, num_outputs), device=device)
    return torch.cat(chunks)


def reinitialized_copy(model: ContinualModel, seed: int, task_id: str | None = None) -> ContinualModel:
    """A model of ``model``'s architecture (its heads plus ``task_id``'s) with fresh weights drawn at ``seed``.

    A registered class is rebuilt from ``model.describe()`` (its constructor's initialisation);
    any other is deep-copied and re-initialised with ``reset_parameters``. Weights are drawn on
    the CPU from a forked generator (the global random state is left as it was), then moved to
    ``model``'s device and dtype, so the same seed gives the same weights on every device.
    """
    description = model.describe()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        if registered_models().get(description["class"]) is type(model):
            fresh = rebuild_model(description)
        else:
            fresh = copy.deepcopy(model).cpu()
            reset_parameters(fresh)
        if task_id is not None:
            fresh.add_task_params(task_id)
    ref = next(model.parameters(), None)
    if ref is not None:
        fresh = fresh.to(device=ref.device, dtype=ref.dtype)
    if getattr(model, "_retain_float64", False):
        use_float64(fresh)
    return fresh


class RepeatedDistillationLearner(ReplayLearner):
    """The consolidation learner of RD: distils the stored logits of the memory into a fresh model.

    At ``on_model_update_start`` the new data enters the reservoir memory with the expert logits
    given beforehand by ``update_expert_logits`` (metadata ``'logits'``; items already stored keep
    their logits, which the previous update refreshed with the previous consolidated model), and
    the model is re-initialised (seeded by ``initialization_seed('consolidated')``). Training then
    sees the memory only: ``train_dataloader`` yields ``(raw inputs, stored logits)`` batches of
    ``consolidation_batch_size`` (default ``batch_size``) and ``training_step`` is the mean
    ``double_distillation_loss`` of the model's logits (memory transform applied to the inputs)
    against the stored ones. ``on_model_update_end`` refreshes every stored logit with the new
    model. The stored logits are unmasked, over all C outputs of the head.

    ``task_id`` selects the head trained on the whole memory; the memory keeps no task ids, so RD
    is meant for one head (the spec's variant is for a fixed set of classes): since each update
    re-initialises the whole model, heads of other task ids do not survive an update.

    Args:
        consolidation_epochs: epochs of the consolidation on the memory (default: max_epochs).
        consolidation_batch_size: batch size of the consolidation (default: batch_size).
    """

    def required_memory_metadata(self) -> dict[str, tuple[int, ...] | None]:
        return {LOGITS: self.output_shape()}

    def __init__(
        self,
        memory_size: int,
        consolidation_epochs: int | None = None,
        consolidation_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("batch_memory_frac", 0.0)
        super().__init__(memory_size=memory_size, **kwargs)
        if memory_size < 1:
            raise ValueError("Repeated Distillation consolidates from the memory alone: memory_size must be >= 1")
        for name, value in (
            ("consolidation_epochs", consolidation_epochs),
            ("consolidation_batch_size", consolidation_batch_size),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.consolidation_epochs = (
            consolidation_epochs if consolidation_epochs is not None else self.options.max_epochs
        )
        self.consolidation_batch_size = (
            consolidation_batch_size if consolidation_batch_size is not None else self.options.batch_size
        )
        self._expert_logits: Tensor | None = None
        self._memory_source: BatchSource | None = None

    def initialization_seed(self, role: str) -> int:
        """Seed of this update's fresh weights for ``role`` 'expert' or 'consolidated'
        (a function of the learner's seed and the number of updates done)."""
        stream = {"expert": 1, "consolidated": 2}[role]
        return (self.seed * SEED_STRIDE + self.updates_done * 7_919 + stream * 104_729) % _SEED_MODULUS

    def update_expert_logits(self, new_expert_logits: Tensor) -> None:
        """Sets the expert's logits (N, C) of the next update's new data, in dataset order."""
        if new_expert_logits.dim() != 2:
            raise ValueError(f"expert logits must have shape (N, C), got {tuple(new_expert_logits.shape)}")
        self._expert_logits = new_expert_logits.detach().float().to(self.device)

    def on_model_update_start(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Callable | None = None,
        val_dataset_collate_fn: Callable | None = None,
        task_id: str | None = None,
    ) -> None:
        """Adds the new data with the expert logits to the memory and re-initialises the model."""
        if self._expert_logits is None:
            raise ValueError("no expert logits: call update_expert_logits before the update (the updater does)")
        super().on_model_update_start(
            train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id
        )
        if len(self.task_ids_seen) > 1:
            warnings.warn(
                f"Repeated Distillation re-initialises the whole model each update and distils the memory "
                f"through the head of {self.task_id!r} only; the heads of {self.task_ids_seen} other than it "
                "are not kept. Use one task id.",
                stacklevel=2,
            )
        assert self._train_source is not None
        source = self._train_source
        logits, self._expert_logits = self._expert_logits, None
        length = dataset_length(source.dataset)
        if length is not None and logits.shape[0] != length:
            raise ValueError(f"got expert logits for {logits.shape[0]} items, but the new data has {length}")
        # The new data enters the reservoir in dataset order, batch by batch (streamed), read exactly
        # as the updater read it for the expert's logits (batch size, collate, workers): same order.
        offset = 0
        reads = (source.dataset, self.logits_batch_size, source.collate_fn, self.device, source.loader_options)
        for inputs, targets in iter_batches(*reads, "train_dataset"):
            n = targets.shape[0]
            if offset + n > logits.shape[0]:
                raise ValueError(f"got expert logits for {logits.shape[0]} items, but the new data has more")
            self.memory.add(inputs, targets, {LOGITS: logits[offset : offset + n]})
            offset += n
        if offset != logits.shape[0]:
            raise ValueError(f"got expert logits for {logits.shape[0]} items, but the new data has {offset}")
        self._train_source = None
        fresh = reinitialized_copy(self.model, self.initialization_seed("consolidated"))
        self.model.load_state_dict(fresh.state_dict())
        memory_inputs, _, metadata = self.memory.raw_items()
        self._memory_source = BatchSource(
            NestedTensorDataset(memory_inputs, metadata[LOGITS]),
            self.consolidation_batch_size,
            self.device,
            shuffle=True,
            generator=self.generator,
        )

    def train_dataloader(self) -> BatchSource:
        """One epoch over the memory: batches of (raw inputs, stored logits), shuffled."""
        assert self._memory_source is not None, "call on_model_update_start first"
        return self._memory_source

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Mean double distillation loss of the model on memory items against their stored logits."""
        raw_inputs, target_logits = batch
        inputs = self.memory.transform(raw_inputs) if self.memory.transform is not None else raw_inputs
        outputs = self.forward_model(inputs, self.task_id)
        return double_distillation_loss(outputs, target_logits.to(outputs.dtype)).mean()

    def on_model_update_end(self) -> None:
        """Refreshes every stored logit with the consolidated model (the targets of the next update)."""
        logits = extract_logits(self.model, self.memory, self.logits_batch_size, self.task_id)
        self.memory.set_metadata(LOGITS, logits)
        self._memory_source = None
        super().on_model_update_end()

    @property
    def logits_batch_size(self) -> int:
        """Batch size of logit extraction (eval mode: it does not change the logits)."""
        return max(self.options.batch_size, 256)


class _PrefixedLogger:
    """Logs the expert's metrics as ``expert_<name>`` to the user's logger."""

    def __init__(self, logger: Any, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logger.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)


class RepeatedDistillationModelUpdater(ModelUpdater):
    """Repeated Distillation: train an expert from scratch on the new data, then consolidate.

    Per update: (1) an expert, a copy of the model with re-initialised weights
    (``reinitialized_copy`` at ``learner.initialization_seed('expert')``), is trained with
    ``loss_fn`` on the new data alone by a plain ``Learner`` for ``max_epochs`` epochs of
    ``batch_size`` (no validation data, no early stopping; its metrics reach the logger as
    ``expert_*``); (2) its logits on the new data (memory transform applied, eval mode) go to the
    learner; (3)-(5) the learner adds the new data with these logits to the reservoir memory,
    re-initialises the consolidated model, trains it on the memory only with the double
    distillation loss for ``consolidation_epochs`` (default ``max_epochs``) epochs of
    ``consolidation_batch_size`` (default ``batch_size``) items, validating it on
    ``val_dataset`` and the stored val data of earlier updates (see ``validation_data``) after
    each epoch (early stopping, if enabled, watches these metrics), and refreshes all stored
    logits with it. The expert is discarded; the consolidated model, the memory with its logits
    and the learner's counters and generators are the state.

    When classes grow (class-incremental), the expert's head has all C outputs and was trained
    with ``loss_fn`` on the new classes only: without ``mask_unused_classes`` its logits for the
    other classes are pushed down, which is what the consolidated model learns for new items,
    while old items keep the previous consolidated model's logits. The per-sample mean
    subtraction of the loss (DMC) removes the offset between the two teachers. With
    ``mask_unused_classes=True`` the expert's logits of absent classes are untrained (not masked
    in the stored targets), so leave it off for RD.

    Differences from the spec: ``loss_fn``/``optimizer`` may be omitted (cross-entropy; the
    optimizer must still be given) and ``memory_size`` defaults to 500, as for retain's ER
    updaters; options after ``memory_size`` are keyword-only. ``seed`` defaults to None (a random
    seed) as in the spec. The output folder's lock is held for the consolidation and the write of
    the state, not while the expert trains (which writes nothing).
    """

    learner_class = RepeatedDistillationLearner

    def _build(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | Callable[[Tensor, Tensor], Tensor] | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        memory_size: int,
        consolidation_epochs: int | None,
        consolidation_batch_size: int | None,
        input_state_folder: Any,
        output_state_folder: Any,
        **options: Any,
    ) -> None:
        """The constructor's body; ``__init__`` (generated below) binds the arguments to its signature."""
        if (options.get("devices") or 1) > 1:
            raise ValueError(
                f"{type(self).__name__} runs on one process: devices={options['devices']} is not supported "
                "(its expert and consolidation phases are not distributed); use devices=1"
            )
        ModelUpdater.__init__(
            self,
            model,
            loss_fn,
            optimizer,
            learner_class=self.learner_class,
            learner_kwargs={
                "memory_size": memory_size,
                "consolidation_epochs": consolidation_epochs,
                "consolidation_batch_size": consolidation_batch_size,
            },
            input_state_folder=input_state_folder,
            output_state_folder=output_state_folder,
            **options,
        )
        self.last_expert_fit: FitResult | None = None

    def update(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        train_dataset_collate_fn: Callable | None = None,
        val_dataset_collate_fn: Callable | None = None,
        task_id: str | None = None,
    ) -> ContinualModel:
        """Trains an expert on ``train_dataset``, consolidates it with the memory, returns the consolidated model.

        The new data is streamed (read in batches, never held whole): once per expert epoch,
        once for the expert's logits, once into the memory."""
        learner = self.learner
        learner.check_validation_data(val_dataset)  # before the expert trains, not after
        with deterministic(self.options.deterministic_trainer):
            expert = self.train_expert(train_dataset, task_id, train_dataset_collate_fn)
            dataset, collate_fn, loading = unwrap_loader(
                train_dataset, train_dataset_collate_fn, self.options.loader_options()
            )  # the same loader settings as the reservoir writes, so that a split stream lines up
            logits = extract_logits(
                expert, dataset, learner.logits_batch_size, task_id or DEFAULT_TASK_ID, learner.memory.transform,
                collate_fn=collate_fn, loader_options=loading,
            )  # fmt: skip
        del expert
        learner.update_expert_logits(logits)
        return super().update(train_dataset, val_dataset, train_dataset_collate_fn, val_dataset_collate_fn, task_id)

    def train_expert(
        self, train_dataset: Dataset, task_id: str | None = None, collate_fn: Callable | None = None
    ) -> ContinualModel:
        """Trains and returns this update's expert: fresh weights, ``loss_fn`` on ``train_dataset`` only."""
        learner = self.learner
        seed = learner.initialization_seed("expert")
        expert = reinitialized_copy(self.model, seed, task_id or DEFAULT_TASK_ID)
        logger = self.options.logger
        options = replace(
            self.options,
            seed=seed,
            early_stopping_enabled=False,
            metric=None,
            logger=_PrefixedLogger(logger, "expert_") if logger is not None else None,
        )
        expert_learner = Learner(
            model=expert, loss_fn=learner.loss_fn, optimizer=learner.optimizer_factory, options=options
        )
        torch.manual_seed(seed)  # dropout and other draws of the expert's training
        expert_learner.on_model_update_start(train_dataset, None, collate_fn, None, task_id)
        self.last_expert_fit = fit(expert_learner, description=f"{self.method_name} expert {expert_learner.task_id}")
        expert_learner.on_model_update_end()
        return expert

    def train(self) -> FitResult:
        learner = self.learner
        assert isinstance(learner, RepeatedDistillationLearner)
        return fit(
            learner,
            max_epochs=learner.consolidation_epochs,
            description=f"{self.method_name} consolidation {learner.task_id}",
        )


install_signature(
    RepeatedDistillationModelUpdater,
    [
        *model_arguments(),
        inspect.Parameter("memory_size", POSITIONAL_OR_KEYWORD, default=500, annotation=int),
        inspect.Parameter("consolidation_epochs", KEYWORD_ONLY, default=None, annotation="int | None"),
        inspect.Parameter("consolidation_batch_size", KEYWORD_ONLY, default=None, annotation="int | None"),
        *state_folder_arguments(),
        *training_option_parameters(seed=None),
    ],
    RepeatedDistillationModelUpdater._build,
    option_docs(RepeatedDistillationLearner, ReplayLearner, UpdaterArguments, TrainingOptions),
)

__all__ = [
    "RepeatedDistillationLearner",
    "RepeatedDistillationModelUpdater",
    "double_distillation_loss",
    "extract_logits",
    "reinitialized_copy",
]
