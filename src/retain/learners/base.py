"""Learners: the training logic of a method, with the hooks of the spec's LightningModule.

A learner does not run its own loop; the updater's loop (``retain.updaters.loop``) calls
``on_model_update_start`` -> ``configure_optimizers`` -> ``on_train_start`` -> per step
``training_step`` / optimizer step / ``on_train_batch_end`` -> ``validation_step`` per epoch ->
``on_model_update_end``. Differences from the spec, forced by leaving Lightning's Trainer out
of the hot path (it costs ~2.6x a bare loop at batch 20): ``training_step_end`` does not exist
in Lightning 2 and its work (memory updates) happens in ``on_train_batch_end``, after the
optimizer step; the checkpoint hooks receive ``{"json": {...}, "tensors": {...}}`` rather than a
pickled dict, so that state folders hold JSON and safetensors only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

import retain.nested as nested
from retain.batching import BatchSource, dataset_labels, describe_inputs, unwrap_loader
from retain.memory import ReservoirMemory
from retain.models.adapter import as_continual_model
from retain.models.base import DEFAULT_TASK_ID, ContinualModel
from retain.options import TrainingOptions
from retain.val_history import ValidationBatches, ValidationHistory

if TYPE_CHECKING:
    import torchmetrics

Batch = tuple[nested.NestedTensors, Tensor]
Checkpoint = dict[str, dict[str, Any]]


def new_checkpoint() -> Checkpoint:
    return {"json": {}, "tensors": {}}


def _cast_floating_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        a.to(torch.float64) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 else a
        for a in args
    )


def use_float64(model: nn.Module) -> nn.Module:
    """``precision='64'``: the model's weights become float64 and a forward pre-hook casts its
    floating-point inputs to float64 (memory items and transforms stay as they are). Idempotent;
    copies of the model (CLS-ER's EMA copies) keep the hook."""
    model.to(torch.float64)
    if not getattr(model, "_retain_float64", False):
        model.register_forward_pre_hook(_cast_floating_inputs)
        model._retain_float64 = True  # type: ignore[assignment]
    return model


def clear_activation_caches(*modules: nn.Module | None) -> None:
    """Drops what forward passes cached in the ``ContinualModel``s among ``modules`` (their
    intermediate representations, which hold the last step's autograd graph)."""
    for module in modules:
        if isinstance(module, ContinualModel):
            module.reset_intermediate_representation_cache()


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class Learner:
    """Plain training on the current data: the base of every method and the fine-tuning learner.

    ``optimizer`` is a callable on the model's parameters (e.g. ``functools.partial(torch.optim.SGD,
    lr=0.1)``); ``learning_rate_scheduler`` a callable on the optimizer. The training options are
    given as ``options=TrainingOptions(...)`` or as keyword arguments of the same names.
    """

    def __init__(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        options: TrainingOptions | None = None,
        **option_kwargs: Any,
    ) -> None:
        if options is None:
            options = TrainingOptions.from_kwargs(type(self).__name__, **option_kwargs)
        elif option_kwargs:
            raise TypeError("give the training options either as `options` or as keyword arguments, not both")
        if optimizer is None:
            raise ValueError("an optimizer factory is required, e.g. functools.partial(torch.optim.SGD, lr=0.01)")
        model = as_continual_model(model)
        if options.feature_layers is not None and model.feature_layers != options.feature_layers:
            model.use_feature_layers(options.feature_layers)
        if options.float64:
            use_float64(model)
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(reduction="none")
        self.optimizer_factory = optimizer
        self.options = options
        self.device = model_device(model)
        seed = options.seed if options.seed is not None else int(torch.seed() % (2**31))
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.global_step = 0
        self.updates_done = 0
        self.task_id = DEFAULT_TASK_ID
        self.task_ids_seen: list[str] = []
        self._class_mask: Tensor | None = None
        self._train_source: BatchSource | None = None
        self._val_source: ValidationBatches | None = None
        # the validation data of earlier updates (``validation_data='all'``, see retain.val_history)
        self.val_history = ValidationHistory(options.validation_data, options.pad_values)
        self._val_metrics: torchmetrics.MetricCollection | None = None
        # weights of the best epoch by ``options.metric`` during an update (kept in resume checkpoints)
        self.best_state: dict[str, Tensor] | None = None
        self.forward_model: nn.Module = model  # the module that runs forward passes (a DDP wrapper under DDP)

    # ------------------------------------------------------------------ batch sizes and data
    @property
    def train_batch_size(self) -> int:
        """Number of new-data items per step."""
        return self.options.batch_size

    def on_model_update_start(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        train_dataset_collate_fn: Callable | None = None,
        val_dataset_collate_fn: Callable | None = None,
        task_id: str | None = None,
    ) -> None:
        """Prepares an update: task head, data sources, class mask, checks on the data.

        ``train_dataset``/``val_dataset`` may be map-style or iterable datasets, or DataLoaders
        (their dataset and collate function are used, see ``retain.batching``)."""
        self.check_validation_data(val_dataset)
        self.task_id = task_id or DEFAULT_TASK_ID
        self.model.add_task_params(self.task_id)
        loading = self.options.loader_options()
        train_dataset, train_dataset_collate_fn, train_loading = unwrap_loader(
            train_dataset, train_dataset_collate_fn, loading
        )
        self._train_source = BatchSource(
            train_dataset,
            self.train_batch_size,
            self.device,
            shuffle=True,
            generator=self.generator,
            collate_fn=train_dataset_collate_fn,
            loader_options=train_loading,
            where="train_dataset",
        )
        self._val_source = None
        current_val: BatchSource | None = None
        if val_dataset is not None:
            val_dataset, val_dataset_collate_fn, val_loading = unwrap_loader(
                val_dataset, val_dataset_collate_fn, loading
            )
            current_val = BatchSource(
                val_dataset,
                max(self.options.batch_size, 256),
                self.device,
                shuffle=False,
                collate_fn=val_dataset_collate_fn,
                loader_options=val_loading,
                where="val_dataset",
            )
        self._check_data(self._train_source, "train_dataset")
        if current_val is not None:
            self._check_data(current_val, "val_dataset")
        # this update's val data joins the stored history (``validation_data='all'``): validation
        # runs over the val data of every update so far, each through its own task's head
        self.val_history.begin_update(self.updates_done, self.task_id, val_dataset, val_dataset_collate_fn)
        self._val_source = self.val_history.batches(
            self.updates_done, current_val, self.task_id, max(self.options.batch_size, 256), self.device
        )
        self._class_mask = self._compute_class_mask(self._train_source) if self.options.mask_unused_classes else None
        if self.task_id not in self.task_ids_seen:  # only once the data passed the checks
            self.task_ids_seen.append(self.task_id)

    def check_validation_data(self, val_dataset: Dataset | None) -> None:
        """Refuses, before any training, options that monitor validation metrics without val data
        (neither a ``val_dataset`` nor, with ``validation_data='all'``, stored val data of earlier updates)."""
        o = self.options
        stored = self.val_history.num_items(before_update=self.updates_done) if self.val_history.keeps else 0
        if val_dataset is None and not stored and (o.early_stopping_enabled or o.metric is not None):
            what = "early_stopping_enabled" if o.early_stopping_enabled else f"metric={o.metric!r}"
            earlier = " and no earlier update's val data is stored" if self.val_history.keeps else ""
            raise ValueError(
                f"{what} monitors validation metrics, but this update has no val_dataset{earlier}: pass one"
            )

    def _check_data(self, source: BatchSource, name: str) -> None:
        """Fails fast, before training, on data the model cannot take."""
        inputs, targets = source.tensors if source.tensors is not None else source.first_batch()
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dim() != 1:
            raise ValueError(
                f"{name}: targets must be a 1-D integer tensor of class indices, got "
                f"{targets.dtype} of shape {tuple(targets.shape)}"
            )
        try:
            n = nested.batch_size(inputs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from None
        if n != targets.shape[0]:
            raise ValueError(f"{name}: {n} inputs but {targets.shape[0]} targets in a batch")
        for path, leaf in nested.leaves(inputs):
            if leaf.dtype.is_floating_point and not bool(torch.isfinite(leaf).all()):
                bad = int((~torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(dim=1)).nonzero()[0, 0])
                raise ValueError(f"{name}: item {bad}: inputs{'.' + path if path else ''} contain NaN or Inf")
        probe_x, _ = self.transform_train(nested.index(inputs, slice(0, 2)), targets[:2])
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                logits = self.model(probe_x, self.task_id)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise TypeError(f"the model must return logits of shape (B, C), got {got}")
        except Exception as err:
            raise ValueError(
                f"{name}: inputs {describe_inputs(inputs)} do not fit the model "
                f"{type(self.model).__name__} (after the train transform): {err}"
            ) from None
        finally:
            self.model.train(was_training)
        num_classes = logits.shape[-1]
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            bad = int(((targets < 0) | (targets >= num_classes)).nonzero()[0, 0])
            raise ValueError(
                f"{name}: labels must lie in [0, {num_classes - 1}] for this model, found [{lo}, {hi}] "
                f"(first at item {bad})"
            )
        source.num_classes = num_classes  # every later batch from a loader is checked on the host

    def _compute_class_mask(self, source: BatchSource) -> Tensor:
        """The classes of this update: ``update_classes`` when declared, else the labels of the
        training data (tensors or a ``targets`` attribute, else read batch by batch; no inputs kept)."""
        num_classes = self.model.num_outputs
        if self.options.update_classes is not None:
            classes = torch.as_tensor(self.options.update_classes, dtype=torch.long)
            if int(classes.max()) >= num_classes:
                raise ValueError(
                    f"update_classes {self.options.update_classes} exceed the model's {num_classes} classes"
                )
        elif source.tensors is not None:
            classes = source.tensors[1].unique()
        else:
            classes = dataset_labels(source.dataset, source.collate_fn, source.loader_options).unique()
        mask = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        mask[classes.to(self.device)] = True
        memory = self.memory_for_state()
        if self.options.mask_class_set == "current_and_memory" and memory is not None and len(memory):
            mask[memory.raw_items()[1].to(self.device).unique()] = True
        return mask

    @property
    def masked_classes(self) -> list[int] | None:
        """The classes whose logits the loss on new data keeps this update (None: no mask).

        ``mask_class_set='current'`` (default): this update's classes only, applied to the loss on
        the new data alone; stored logits and replay losses stay unmasked (safe: no -inf target is
        ever stored). ``'current_and_memory'``: the spec's class set (current plus the memory's
        classes), still applied to the new data's loss only: the spec's library also masks the
        memory outputs and stores the masked logits, whose -inf entries give NaN once those classes
        arrive."""
        if self._class_mask is None:
            return None
        return self._class_mask.nonzero().flatten().tolist()

    @property
    def has_train_data(self) -> bool:
        """True between ``on_model_update_start`` and the end of the update (its data is set)."""
        return self._train_source is not None

    def train_dataloader(self) -> BatchSource:
        """The new-data batches of one epoch, on the training device."""
        assert self._train_source is not None, "call on_model_update_start first"
        return self._train_source

    def use_train_shard(self, indices: Tensor, batch_size: int) -> None:
        """Trains this update on the items ``indices`` of ``train_dataloader()``'s dataset only, in
        batches of ``batch_size`` (a DDP rank's shard, see ``retain.updaters.distributed``)."""
        source = self.train_dataloader()
        if source.is_stream:
            raise ValueError("train_dataset: an IterableDataset cannot be sharded over devices; use devices=1")
        self._train_source = BatchSource(
            Subset(source.dataset, indices.tolist()),
            batch_size,
            self.device,
            shuffle=True,
            generator=self.generator,
            collate_fn=source.collate_fn,
            loader_options=source.loader_options,
            where=source.where,
        )

    def val_dataloader(self) -> ValidationBatches | None:
        """The validation batches of one pass: the stored val data of earlier updates
        (``validation_data='all'``), then this update's ``val_dataset``; None without any."""
        return self._val_source

    def transform_train(self, inputs: nested.NestedTensors, targets: Tensor) -> Batch:
        o = self.options
        if o.train_transform is not None:
            inputs = o.train_transform(inputs)
        if o.train_target_transform is not None:
            targets = o.train_target_transform(targets)
        return inputs, targets

    def transform_test(self, inputs: nested.NestedTensors, targets: Tensor) -> Batch:
        o = self.options
        if o.test_transform is not None:
            inputs = o.test_transform(inputs)
        if o.test_target_transform is not None:
            targets = o.test_target_transform(targets)
        return inputs, targets

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        optimizer = self.optimizer_factory(self.model.parameters())
        scheduler = None
        if self.options.learning_rate_scheduler is not None:
            scheduler = self.options.learning_rate_scheduler(optimizer)
        return optimizer, scheduler

    def on_train_start(self) -> None:
        """Called once per update, before the first step."""

    def base_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss on the current data; with ``mask_unused_classes`` the logits of classes absent
        from this update's data are masked (only here: stored logits stay unmasked)."""
        if self._class_mask is not None:
            outputs = outputs.masked_fill(~self._class_mask, torch.finfo(outputs.dtype).min)
        return self.loss_fn(outputs, targets).mean()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        inputs, targets = self.transform_train(*batch)
        return self.base_loss(self.forward_model(inputs, self.task_id), targets)

    def on_train_batch_end(self, outputs: Tensor, batch: Batch, batch_idx: int) -> None:
        """Called after the optimizer step."""
        self.global_step += 1

    def on_train_end(self) -> None:
        """Called once per update, after the last step: drops the activations the last forward
        cached (with their autograd graph), so the returned model can be copied and the memory is freed."""
        clear_activation_caches(self.model, self.inference_model())

    def on_model_update_end(self) -> None:
        self.updates_done += 1
        self._train_source = None
        self._val_source = None

    # ------------------------------------------------------------------ validation
    def _make_val_metrics(self) -> torchmetrics.MetricCollection:
        import torchmetrics  # imported on first use: it pulls in matplotlib and scipy (seconds at start-up)

        metrics: dict[str, torchmetrics.Metric] = {
            "loss": torchmetrics.MeanMetric(),
            "accuracy": torchmetrics.classification.MulticlassAccuracy(
                num_classes=self.model.num_outputs, average="micro", validate_args=False
            ),
        }
        for name, metric in (self.options.logged_metrics or {}).items():
            metrics[name] = metric.clone()
        return torchmetrics.MetricCollection(metrics).to(self.device)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if self._val_metrics is None:
            self._val_metrics = self._make_val_metrics()
        inputs, targets = self.transform_test(*batch)
        task_id = self._val_source.task_id if self._val_source is not None else None  # the head of the batch's update
        outputs = self.inference_model()(inputs, task_id or self.task_id)
        for name, metric in self._val_metrics.items():
            if name == "loss":
                metric.update(self.loss_fn(outputs, targets))
            else:
                metric.update(outputs, targets)

    def compute_validation_metrics(self) -> dict[str, float]:
        if self._val_metrics is None:
            return {}
        values = {f"val_{k}": float(v) for k, v in self._val_metrics.compute().items()}
        self._val_metrics.reset()
        return values

    def inference_model(self) -> ContinualModel:
        """The model to predict with (and to save as ``model.safetensors``)."""
        return self.model

    def snapshot_best(self) -> None:
        """Keeps a copy of the current weights as the best epoch's (``metric`` improved)."""
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        served = self.inference_model()
        if served is not self.model:
            state.update({f"served.{k}": v.detach().clone() for k, v in served.state_dict().items()})
        self.best_state = state

    def restore_best(self) -> None:
        """Puts the best epoch's weights back (the working and the served model) and forgets them."""
        if self.best_state is None:
            return
        for prefix, model in (("model.", self.model), ("served.", self.inference_model())):
            part = {k[len(prefix) :]: v for k, v in self.best_state.items() if k.startswith(prefix)}
            if part:
                model.load_state_dict(part, strict=True)
        self.best_state = None

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Adds this learner's state: JSON values to ``checkpoint['json']``, tensors to ``['tensors']``."""
        checkpoint["json"].update(
            {"global_step": self.global_step, "updates_done": self.updates_done, "task_ids_seen": self.task_ids_seen}
        )
        checkpoint["json"].update(self.val_history.json())
        checkpoint["tensors"]["generator_state"] = self.generator.get_state().clone()
        for key, value in (self.best_state or {}).items():  # only inside an update (resume checkpoints)
            checkpoint["tensors"][f"best_state.{key}"] = value

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        best = {k[len("best_state.") :]: v for k, v in checkpoint["tensors"].items() if k.startswith("best_state.")}
        self.best_state = best or None
        self.global_step = int(checkpoint["json"]["global_step"])
        self.updates_done = int(checkpoint["json"]["updates_done"])
        self.task_ids_seen = [str(t) for t in checkpoint["json"]["task_ids_seen"]]
        self.val_history.load_json(checkpoint["json"])  # the chunk files are mapped by the updater
        self.generator.set_state(checkpoint["tensors"]["generator_state"].to(torch.uint8))

    def memory_for_state(self) -> ReservoirMemory | None:
        """The memory the updater saves in ``memory.safetensors`` (None for memory-free learners)."""
        return None

    def required_memory_metadata(self) -> dict[str, tuple[int, ...] | None]:
        """Metadata columns a loaded memory must hold for this learner, with their per-item shape
        (None: any shape); a state without them is refused at load, not mid-update."""
        return {}

    def output_shape(self) -> tuple[int, ...] | None:
        """Per-item shape of the model's outputs when the model declares it (``num_outputs``)."""
        num_outputs = getattr(self.model, "num_outputs", None)
        return (int(num_outputs),) if isinstance(num_outputs, int) else None


class ReplayLearner(Learner):
    """A learner with a reservoir memory on the training device.

    ``batch_size`` counts new plus memory items, split by ``batch_memory_frac`` as in the spec
    (memory part ``int(batch_size * batch_memory_frac)``). To give the memory batch directly (the
    DER paper's 10 new + 128 memory), pass ``memory_batch_size``: ``batch_size`` is then the
    new-data batch alone.

    Args:
        memory_size: number of items the reservoir memory keeps (spread over all updates).
        batch_memory_frac: share of batch_size taken from the memory when memory_batch_size is None.
        memory_batch_size: memory items per step, given directly; batch_size is then the new-data batch alone.
    """

    def __init__(
        self,
        memory_size: int,
        batch_memory_frac: float = 0.5,
        memory_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an integer >= 0, got {memory_size!r}")
        if not 0.0 <= batch_memory_frac < 1.0:
            raise ValueError(f"batch_memory_frac must lie in [0, 1), got {batch_memory_frac!r}")
        if memory_batch_size is not None and (not isinstance(memory_batch_size, int) or memory_batch_size < 0):
            raise ValueError(f"memory_batch_size must be an integer >= 0 or None, got {memory_batch_size!r}")
        if memory_batch_size is None:
            self.memory_batch_size = int(self.options.batch_size * batch_memory_frac)
            self._new_batch_size = self.options.batch_size - self.memory_batch_size
        else:
            self.memory_batch_size = memory_batch_size
            self._new_batch_size = self.options.batch_size
        o = self.options
        extra: dict[str, Any] = {"pad_values": dict(o.pad_values)} if o.pad_values else {}
        self.memory = ReservoirMemory(
            memory_size,
            **extra,
            memory_device=o.memory_device,
            device=self.device,
            seed=self.seed + 1,
            transform=o.buffer_transform if o.buffer_transform is not None else o.train_transform,
            target_transform=(
                o.buffer_target_transform if o.buffer_target_transform is not None else o.train_target_transform
            ),
        )

    @property
    def train_batch_size(self) -> int:
        return self._new_batch_size

    def memory_for_state(self) -> ReservoirMemory | None:
        return self.memory

    def on_model_update_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_model_update_start(*args, **kwargs)
        stored = self.memory.inputs
        if stored is not None:
            assert self._train_source is not None
            source = self._train_source
            inputs, _ = source.tensors if source.tensors is not None else source.first_batch()
            check_joinable(inputs, stored)


def check_joinable(inputs: nested.NestedTensors, stored: nested.NestedTensors) -> None:
    """Refuses new raw inputs that the memory cannot hold beside its items: other leaves, dtypes or
    numbers of dims (lengths may differ: the memory pads variable-length leaves)."""
    new, old = dict(nested.leaves(inputs)), dict(nested.leaves(stored))
    if list(new) != list(old):
        raise ValueError(
            f"train_dataset: inputs with leaves {list(new)} cannot join the memory, which holds leaves {list(old)}"
        )
    for path, leaf in new.items():
        kept = old[path]
        if leaf.dtype != kept.dtype or leaf.dim() != kept.dim():
            raise ValueError(
                f"train_dataset: raw inputs{'.' + path if path else ''} of per-item shape {tuple(leaf.shape[1:])} and "
                f"dtype {leaf.dtype} cannot join the memory, which holds {tuple(kept.shape[1:])} {kept.dtype} "
                "from earlier updates"
            )
