"""The experience-replay family of the spec's ``er`` module: ER, DER/DER++, POD-ER, CLS-ER, Super-ER.

Every method is ``BaseExperienceReplayLearner`` plus a list of components; every updater is a
thin class that names the method's own options. The step, for a new batch ``(x, y)``:

    m      = memory.sample(k)                       # first memory batch, joined to x in one forward
    z      = model(cat(T(x), m.x))
    loss   = loss_weight * CE(z[:n], y)
           + sum_c component_c(z on its memory batch)   # each draws a fresh batch if it asks to
    loss  /= loss_weight + sum of weights used      # when loss_normalization
    optimizer step; memory.add(x, y, logits=z[:n], features=...); EMA of replayed metadata
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import retain.nested as nested
from retain.learners.base import Batch, Checkpoint, ReplayLearner, clear_activation_caches
from retain.learners.components import (
    LOGITS,
    Component,
    ShrinkAndPerturbReinitializationComponent,
    WeightedCLSLossComponent,
    WeightedCustomLossComponent,
    WeightedMeanSquaredErrorLossComponent,
    WeightedPooledOutputDistillationLossComponent,
)
from retain.memory import MemoryBatch
from retain.models.base import ContinualModel
from retain.options import (
    KEYWORD_ONLY,
    POSITIONAL_OR_KEYWORD,
    TRAINING_OPTION_NAMES,
    TrainingOptions,
    UpdaterArguments,
    install_signature,
    model_arguments,
    option_docs,
    state_folder_arguments,
    training_option_parameters,
)
from retain.updaters.base import SingleTrainingLoopUpdater

DEFAULT_MEMORY_SIZE = 500  # the spec requires memory_size; retain's updaters default to 500


_NON_NEGATIVE = ("alpha", "beta", "der_alpha", "der_beta", "cls_alpha", "pod_alpha", "sp_sigma", "loss_weight")

_CONTEXT = ("self", "model", "loss_fn")  # the components' arguments that come from the learner, not options


def _install_learner_signature(cls: type[BaseExperienceReplayLearner]) -> None:
    """Gives a method's learner the constructor its ``components`` defines: the method's options
    (positional, in that order), then the base options by name, then the learner's arguments."""
    base = inspect.signature(BaseExperienceReplayLearner.__init__).parameters
    own = [
        p.replace(kind=POSITIONAL_OR_KEYWORD)
        for name, p in inspect.signature(cls.components).parameters.items()
        if name not in _CONTEXT
    ]
    parameters = [
        *own,
        *(
            base[name].replace(kind=KEYWORD_ONLY)
            for name in ("loss_weight", "ema_memory_update_gamma", "loss_normalization")
        ),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]

    def build(self: BaseExperienceReplayLearner, kwargs: dict[str, Any], **arguments: Any) -> None:
        BaseExperienceReplayLearner.__init__(self, **arguments, **kwargs)

    docs = option_docs(cls, BaseExperienceReplayLearner) | {
        "kwargs": "the learner's arguments: model, loss_fn, optimizer, memory_size, ... and the training options"
    }
    install_signature(cls, parameters, build, docs)


def _check_method_options(options: dict[str, Any]) -> None:
    """Refuses negative loss weights and a non-positive shrink factor before anything is built."""
    for name in _NON_NEGATIVE:
        if name in options and not float(options[name]) >= 0.0:
            raise ValueError(f"{name} must be >= 0 (a loss weight), got {options[name]!r}")
    if "sp_shrink_factor" in options and not float(options["sp_shrink_factor"]) > 0.0:
        raise ValueError(
            "sp_shrink_factor must be > 0 (1 keeps the weights, 0 would erase them), "
            f"got {options['sp_shrink_factor']!r}"
        )


def _ce(loss_fn: nn.Module | None) -> nn.Module:
    return loss_fn if loss_fn is not None else nn.CrossEntropyLoss(reduction="none")


@dataclass
class NewItems:
    """The new batch of a step as the memory stores it: raw (untransformed) inputs and targets,
    and the detached logits / intermediate features when a component needs them stored."""

    inputs: nested.NestedTensors
    targets: Tensor
    logits: Tensor | None
    features: list[Tensor]


@dataclass
class Replayed:
    """A memory batch replayed in a step with its detached outputs, for the EMA refresh."""

    batch: MemoryBatch
    logits: Tensor
    features: list[Tensor]


class BaseExperienceReplayLearner(ReplayLearner):
    """Experience replay over a reservoir memory, for the online setting (one pass per chunk).

    Differences from the spec, with the behaviour kept: the first memory batch is joined to the
    new batch in one forward pass (as in the ER and CLS-ER papers' code; BatchNorm then sees
    both); ``loss_normalization`` divides by the weights of the terms present in the step (during
    the first update the memory is empty and the base loss is not scaled down); memory writes
    happen in ``on_train_batch_end`` (Lightning 2 has no ``training_step_end``).

    Args:
        loss_weight: weight of the loss on the new data (>= 0).
        ema_memory_update_gamma: in (0, 1]; below 1 the stored logits/features of replayed items become
            gamma * stored + (1 - gamma) * current after each step (1: never refreshed).
        loss_normalization: 1 divides the loss by the sum of the weights of the terms present in the step, 0 sums them.
    """

    def __init__(
        self,
        components: dict[str, Component] | None = None,
        loss_weight: float = 1.0,
        ema_memory_update_gamma: float = 1.0,
        loss_normalization: int = 1,
        **kwargs: Any,
    ) -> None:
        if components is None:  # a method: its options are the parameters of its components()
            components = self._build_components(kwargs)
        super().__init__(**kwargs)
        _check_method_options({"loss_weight": loss_weight})
        if not 0.0 < ema_memory_update_gamma <= 1.0:
            raise ValueError(f"ema_memory_update_gamma must lie in (0, 1], got {ema_memory_update_gamma!r}")
        self._components = dict(components)
        for offset, component in enumerate(self._components.values()):
            generator = getattr(component, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self.seed + 100 + offset)
        self.loss_weight = float(loss_weight)
        self.ema_memory_update_gamma = float(ema_memory_update_gamma)
        self.loss_normalization = int(loss_normalization)
        self._loss_components = [c for c in self._components.values() if c.is_loss]
        self._store_logits = any(c.needs_logits for c in self._components.values())
        self._feature_components = [c for c in self._components.values() if c.needs_features]
        self._store_features = bool(self._feature_components)
        self._step_new: NewItems | None = None  # what on_train_batch_end writes to the memory
        self._replayed: list[Replayed] = []  # what on_train_batch_end refreshes (EMA)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "components" in cls.__dict__:
            _install_learner_signature(cls)

    def components(self, **kwargs: Any) -> dict[str, Component]:
        """The learner's components by name (the spec's abstract builder). A method defines its
        options once, as the parameters of its ``components``; they become its constructor's
        options, and ``model`` / ``loss_fn`` are filled in from the learner's own arguments."""
        raise NotImplementedError(f"{type(self).__name__} defines no components(): pass components={{...}}")

    @property
    def built_components(self) -> dict[str, Component]:
        """The components this learner trains with, by name, in the order they run."""
        return dict(self._components)

    def _build_components(self, kwargs: dict[str, Any]) -> dict[str, Component]:
        """Takes the method's options out of ``kwargs`` (by name) and builds its components."""
        accepted = inspect.signature(self.components).parameters
        context = {"model": kwargs.get("model"), "loss_fn": kwargs.get("loss_fn")}
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in accepted and name not in context}
        _check_method_options(options)
        return self.components(**{k: v for k, v in context.items() if k in accepted}, **options)

    def on_model_update_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_model_update_start(*args, **kwargs)
        for component in self._components.values():
            component.on_model_update_start(self.model, self.task_id)

    def on_train_start(self) -> None:
        for component in self._components.values():
            component.on_train_start(self.model)

    def on_train_end(self) -> None:
        super().on_train_end()
        for component in self._components.values():  # CLS-ER's copies cache their last forward too
            clear_activation_caches(*(m for m in vars(component).values() if isinstance(m, nn.Module)))

    def _forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        outputs = self.forward_model(inputs, self.task_id)
        features = self.model.get_intermediate_representation() if self._store_features else []
        return outputs, features

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        raw_inputs, raw_targets = batch
        inputs, targets = self.transform_train(raw_inputs, raw_targets)
        n = inputs.shape[0] if isinstance(inputs, Tensor) else nested.batch_size(inputs)
        memory_batch = None
        if self._loss_components and self.memory_batch_size > 0 and len(self.memory) > 0:
            memory_batch = self.memory.sample(self.memory_batch_size)
        joined = inputs if memory_batch is None else join_batches(inputs, memory_batch.inputs, self._pad_values())
        outputs, features = self._forward(joined)
        # Per step, detach only what on_train_batch_end stores (logits, features) or refreshes (EMA).
        logits_new = outputs[:n].detach() if self._store_logits else None
        self._step_new = NewItems(raw_inputs, raw_targets, logits_new, [f[:n].detach() for f in features])
        self._replayed = []
        refresh = self.ema_memory_update_gamma < 1.0
        loss = self.base_loss(outputs[:n], targets)
        if self.loss_weight != 1.0:  # skipping a product with 1.0 changes no bit
            loss = self.loss_weight * loss
        total_weight = self.loss_weight
        if memory_batch is not None:
            outputs_memory, features_memory = outputs[n:], [f[n:] for f in features]
            fresh = True  # the joined batch was drawn for the first loss component
            for component in self._loss_components:
                if component.sample_new_memory_batch and not fresh:
                    memory_batch = self.memory.sample(self.memory_batch_size)
                    assert memory_batch is not None
                    outputs_memory, features_memory = self._forward(memory_batch.inputs)
                    fresh = True
                if refresh and fresh:
                    self._replayed.append(
                        Replayed(memory_batch, outputs_memory.detach(), [f.detach() for f in features_memory])
                    )
                fresh = False
                loss = loss + component.loss(outputs_memory, memory_batch, features_memory)
                total_weight += component.weight
        if self.loss_normalization and total_weight > 0:  # loss_weight=0 with an empty memory: nothing to divide
            loss = loss / total_weight
        return loss

    def _pad_values(self) -> dict[str, float] | None:
        return getattr(self.memory, "pad_values", None)

    def on_train_batch_end(self, outputs: Tensor, batch: Batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ema_memory_update_gamma < 1.0:
            for replayed in self._replayed:
                self._refresh_metadata(replayed.batch.indices, replayed.logits, replayed.features)
        new = self._step_new
        assert new is not None
        self.memory.add(new.inputs, new.targets, self._metadata(new.logits, new.features))
        self._step_new, self._replayed = None, []
        for component in self._components.values():
            component.on_train_batch_end(self.model)

    def _metadata(self, logits: Tensor | None, features: list[Tensor]) -> dict[str, Tensor]:
        metadata = {}
        if self._store_logits:
            assert logits is not None
            metadata[LOGITS] = logits.float()
        for component in self._feature_components:  # POD: pooled vectors, not the raw maps
            metadata.update(component.memory_features(features))
        return metadata

    def required_memory_metadata(self) -> dict[str, tuple[int, ...] | None]:
        """Metadata columns a loaded memory must hold for this learner (None: any per-item shape);
        passed to ``ReservoirMemory.load_state_dict`` when a state folder is read."""
        required: dict[str, tuple[int, ...] | None] = {LOGITS: self.output_shape()} if self._store_logits else {}
        for component in self._feature_components:
            required.update(component.required_memory_metadata())
        return required

    def _refresh_metadata(self, indices: Tensor, logits: Tensor, features: list[Tensor]) -> None:
        gamma = self.ema_memory_update_gamma
        for name, value in self._metadata(logits, features).items():
            if name in self.memory.metadata:
                self.memory.update_metadata(name, indices, value, gamma)

    def inference_model(self) -> ContinualModel:
        for component in self._components.values():
            if component.served_model is not None:
                return component.served_model  # type: ignore[return-value]
        return self.model

    def on_save_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        for name, component in self._components.items():
            component.on_save_checkpoint(checkpoint, prefix=f"components.{name}.")
        if self.inference_model() is not self.model:
            for key, value in self.model.state_dict().items():
                checkpoint["tensors"][f"working_model.{key}"] = value

    def on_load_checkpoint(self, checkpoint: Checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        for name, component in self._components.items():
            component.on_load_checkpoint(checkpoint, prefix=f"components.{name}.")
        working = {
            k[len("working_model.") :]: v for k, v in checkpoint["tensors"].items() if k.startswith("working_model.")
        }
        if working:
            self.model.load_state_dict(working, strict=True)


def join_batches(
    new: nested.NestedTensors, replayed: nested.NestedTensors, pad_values: dict[str, float] | None = None
) -> nested.NestedTensors:
    """The new batch followed by the replayed one, for one forward pass: each leaf of the replayed
    batch in the new leaf's dtype, and every leaf padded to the longer of the two with its pad
    value (variable-length sequences: the new batch padded to the memory's length or vice versa)."""
    if isinstance(new, Tensor) and isinstance(replayed, Tensor) and new.shape[1:] == replayed.shape[1:]:
        return torch.cat([new, replayed.to(new.dtype)])  # the fast path of fixed-shape tensors
    dtypes = {path: leaf.dtype for path, leaf in nested.leaves(new)}
    flat = {path: leaf.to(dtypes.get(path, leaf.dtype)) for path, leaf in nested.leaves(replayed)}
    replayed = nested.unflatten(nested.structure(replayed), flat)
    return nested.cat([new, replayed], pad_values)


class ExperienceReplayLearner(BaseExperienceReplayLearner):
    """ER (Chaudhry et al., 2019): cross-entropy on replayed items with weight ``alpha``.

    With ``alpha=1``, equal new and memory batches and ``loss_normalization=1`` the loss is the
    mean cross-entropy over the joined batch, as in the paper.

    Args:
        alpha: weight of the cross-entropy on replayed memory items (>= 0).
    """

    def components(self, loss_fn: nn.Module | None = None, alpha: float = 1.0) -> dict[str, Component]:
        return {"memory_loss": WeightedCustomLossComponent(_ce(loss_fn), alpha, sample_new_memory_batch=True)}


class DarkExperienceReplayLearner(ExperienceReplayLearner):
    """DER / DER++ (Buzzega et al., NeurIPS 2020): ``alpha * MSE(z, stored logits)`` on one memory
    batch plus ``beta * CE`` on a second, independently drawn batch; ``beta=0`` is DER. The paper
    sums the terms: use ``loss_normalization=0`` to reproduce it. A subclass of
    ``ExperienceReplayLearner``, as in the spec.

    Args:
        alpha: weight of the mean squared error between the current and the stored logits of memory items (>= 0).
        beta: weight of the cross-entropy on the labels of a second memory batch (>= 0; 0 is DER).
    """

    def components(  # type: ignore[override]
        self, loss_fn: nn.Module | None = None, alpha: float = 1.0, beta: float = 1.0
    ) -> dict[str, Component]:
        return {
            "mse_loss": WeightedMeanSquaredErrorLossComponent(alpha, sample_new_memory_batch=True),
            "memory_loss": WeightedCustomLossComponent(_ce(loss_fn), beta, sample_new_memory_batch=True),
        }


class PooledOutputDistillationExperienceReplayLearner(BaseExperienceReplayLearner):
    """POD-ER (Douillard et al., ECCV 2020): ``alpha * POD`` between the current and the stored
    intermediate representations of replayed items (see ``retain.learners.components.pod_pool``).

    Args:
        alpha: weight of the POD distance between current and stored intermediate features of memory items (>= 0).
        distillation_type: pooling of the squared features: spatial, channel, width, height, gap, flat or pixel.
        normalize: L2-normalise the pooled features before their distance (1) or not (0).
    """

    def components(
        self, alpha: float = 1.0, distillation_type: str = "spatial", normalize: bool | int = 1
    ) -> dict[str, Component]:
        pod = WeightedPooledOutputDistillationLossComponent(
            alpha, sample_new_memory_batch=True, distillation_type=distillation_type, normalize=normalize
        )
        return {"pod_loss": pod}


class CLSExperienceReplayLearner(BaseExperienceReplayLearner):
    """CLS-ER (Arani et al., ICLR 2022): ``alpha * CE`` on replayed items plus ``beta *`` the
    consistency with the better of a plastic and a stable EMA copy; predicts with the stable copy.

    The options are in the order of the spec's constructor (its ``components`` lists the plastic
    copy's options first; they are passed by name, so the order only matters positionally).

    Args:
        alpha: weight of the cross-entropy on replayed memory items (>= 0).
        beta: weight of the consistency (MSE) with the better of the plastic and stable copies' logits (>= 0).
        stable_model_update_weight: the most EMA decay of the stable copy (in [0, 1]; closer to 1: slower).
        plastic_model_update_weight: the most EMA decay of the plastic copy (in [0, 1]).
        stable_model_update_probability: probability that a step updates the stable copy (in [0, 1]).
        plastic_model_update_probability: probability that a step updates the plastic copy (in [0, 1]).
    """

    def components(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | None = None,
        alpha: float = 0.5,
        beta: float = 0.1,
        stable_model_update_weight: float = 0.999,
        plastic_model_update_weight: float = 0.999,
        stable_model_update_probability: float = 0.7,
        plastic_model_update_probability: float = 0.9,
    ) -> dict[str, Component]:
        return {
            "memory_loss": WeightedCustomLossComponent(_ce(loss_fn), alpha, sample_new_memory_batch=True),
            "cls_loss": WeightedCLSLossComponent(
                beta,
                sample_new_memory_batch=False,
                model=model,
                plastic_model_update_weight=plastic_model_update_weight,
                stable_model_update_weight=stable_model_update_weight,
                plastic_model_update_probability=plastic_model_update_probability,
                stable_model_update_probability=stable_model_update_probability,
            ),
        }


class SuperExperienceReplayLearner(BaseExperienceReplayLearner):
    """DER++ + shrink-and-perturb + CLS-ER + POD in one learner; predicts with the CLS stable copy.

    Components, in order: ``mse_loss`` (der_alpha, fresh batch), ``memory_loss`` (der_beta, fresh
    batch), ``cls_loss`` (cls_alpha, same batch as memory_loss), ``shrink_perturb`` (at update
    start), ``pod_loss`` (pod_alpha, fresh batch). ``ema_memory_update_gamma``, the spec's last
    positional option of this learner, is the base class's keyword option here.

    Args:
        der_alpha: weight of the MSE between current and stored logits of memory items (>= 0).
        der_beta: weight of the cross-entropy on memory labels (>= 0).
        sp_shrink_factor: at each update start every weight is multiplied by this (> 0; 1 keeps them).
        sp_sigma: standard deviation of the Gaussian noise then added to every weight (>= 0).
        cls_alpha: weight of the CLS-ER consistency with the plastic/stable copies (>= 0).
        cls_stable_model_update_weight: the most EMA decay of the stable copy (in [0, 1]).
        cls_plastic_model_update_weight: the most EMA decay of the plastic copy (in [0, 1]).
        cls_stable_model_update_probability: probability that a step updates the stable copy (in [0, 1]).
        cls_plastic_model_update_probability: probability that a step updates the plastic copy (in [0, 1]).
        pod_alpha: weight of the POD distance of intermediate features (>= 0).
        pod_distillation_type: POD pooling: spatial, channel, width, height, gap, flat or pixel.
        pod_normalize: L2-normalise the pooled features (1) or not (0).
    """

    def components(
        self,
        model: ContinualModel,
        loss_fn: nn.Module | None = None,
        der_alpha: float = 1.0,
        der_beta: float = 1.0,
        sp_shrink_factor: float = 0.95,
        sp_sigma: float = 0.001,
        cls_alpha: float = 0.1,
        cls_stable_model_update_weight: float = 0.999,
        cls_plastic_model_update_weight: float = 0.999,
        cls_stable_model_update_probability: float = 0.7,
        cls_plastic_model_update_probability: float = 0.9,
        pod_alpha: float = 1.0,
        pod_distillation_type: str = "spatial",
        pod_normalize: bool | int = 1,
    ) -> dict[str, Component]:
        return {
            "mse_loss": WeightedMeanSquaredErrorLossComponent(der_alpha, sample_new_memory_batch=True),
            "memory_loss": WeightedCustomLossComponent(_ce(loss_fn), der_beta, sample_new_memory_batch=True),
            "cls_loss": WeightedCLSLossComponent(
                cls_alpha,
                sample_new_memory_batch=False,
                model=model,
                stable_model_update_weight=cls_stable_model_update_weight,
                plastic_model_update_weight=cls_plastic_model_update_weight,
                stable_model_update_probability=cls_stable_model_update_probability,
                plastic_model_update_probability=cls_plastic_model_update_probability,
            ),
            "shrink_perturb": ShrinkAndPerturbReinitializationComponent(sp_shrink_factor, sp_sigma),
            "pod_loss": WeightedPooledOutputDistillationLossComponent(
                pod_alpha,
                sample_new_memory_batch=True,
                distillation_type=pod_distillation_type,
                normalize=pod_normalize,
            ),
        }


def method_option_parameters(learner_class: type) -> list[inspect.Parameter]:
    """The method's own options: the parameters of ``learner_class.components`` (their one definition)."""
    return [
        p.replace(kind=POSITIONAL_OR_KEYWORD)
        for name, p in inspect.signature(learner_class.components).parameters.items()
        if name not in _CONTEXT
    ]


class _ExperienceReplayModelUpdater(SingleTrainingLoopUpdater):
    """Shared constructor of the ER-family updaters, generated for each subclass from one definition.

    The positional order is the spec's: ``model, loss_fn, optimizer, memory_size,
    batch_memory_frac, loss_weight, ema_memory_update_gamma, loss_normalization``, then the
    method's own options in the order of its learner's signature. Everything after that
    (``memory_batch_size``, the state folders, ``learning_rate_scheduler`` and every other
    training option) is keyword-only, so a call written for another order fails loudly instead
    of, say, naming a state folder ``'epoch'``.
    """

    learner_class: type[BaseExperienceReplayLearner]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "learner_class" not in cls.__dict__:
            return
        replay = inspect.signature(BaseExperienceReplayLearner.__init__).parameters
        memory = inspect.signature(ReplayLearner.__init__).parameters
        prefix = [
            *model_arguments(),
            memory["memory_size"].replace(default=DEFAULT_MEMORY_SIZE),
            memory["batch_memory_frac"],
            replay["loss_weight"],
            replay["ema_memory_update_gamma"],
            replay["loss_normalization"],
        ]
        keyword = [
            memory["memory_batch_size"].replace(kind=KEYWORD_ONLY),
            *state_folder_arguments(),
            *training_option_parameters(),
        ]
        docs = option_docs(cls.learner_class, ReplayLearner, UpdaterArguments, TrainingOptions)
        parameters = [*prefix, *method_option_parameters(cls.learner_class), *keyword]
        install_signature(cls, parameters, _build_er_updater, docs)


def _build_er_updater(
    self: _ExperienceReplayModelUpdater,
    model: ContinualModel,
    loss_fn: nn.Module | None,
    optimizer: Any,
    input_state_folder: Any,
    output_state_folder: Any,
    **arguments: Any,
) -> None:
    options = {k: v for k, v in arguments.items() if k in TRAINING_OPTION_NAMES}
    learner_kwargs = {k: v for k, v in arguments.items() if k not in TRAINING_OPTION_NAMES}
    SingleTrainingLoopUpdater.__init__(
        self,
        model,
        loss_fn,
        optimizer,
        learner_class=self.learner_class,
        learner_kwargs=learner_kwargs,
        input_state_folder=input_state_folder,
        output_state_folder=output_state_folder,
        **options,
    )


class ExperienceReplayModelUpdater(_ExperienceReplayModelUpdater):
    """ER (Chaudhry et al., 2019): replays memory items with a cross-entropy of weight ``alpha``."""

    learner_class = ExperienceReplayLearner


class DarkExperienceReplayModelUpdater(_ExperienceReplayModelUpdater):
    """DER (beta=0) and DER++ (Buzzega et al., 2020): replays stored logits (alpha) and labels (beta)."""

    learner_class = DarkExperienceReplayLearner


class PooledOutputDistillationExperienceReplayModelUpdater(_ExperienceReplayModelUpdater):
    """POD-ER (Douillard et al., 2020): distils the pooled intermediate features of memory items."""

    learner_class = PooledOutputDistillationExperienceReplayLearner


class CLSExperienceReplayModelUpdater(_ExperienceReplayModelUpdater):
    """CLS-ER (Arani et al., 2022): replay plus consistency with plastic and stable EMA copies;
    ``update`` returns the stable copy."""

    learner_class = CLSExperienceReplayLearner


class SuperExperienceReplayModelUpdater(_ExperienceReplayModelUpdater):
    """Super-ER: DER++ + shrink-and-perturb + CLS-ER + POD; ``update`` returns the CLS stable copy."""

    learner_class = SuperExperienceReplayLearner
