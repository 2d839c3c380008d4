"""Components: small, named, weighted pieces of a replay learner (Renate's design).

A loss component returns ``weight * term`` computed on a memory batch; the learner adds the
terms to its base loss. ``sample_new_memory_batch`` asks for a freshly drawn memory batch instead
of the one the previous component used. Components can also act when training starts and after
each optimizer step, and carry state that is saved in the state folder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.learners.base import Checkpoint
from retain.memory import MemoryBatch

LOGITS = "logits"


def feature_name(i: int) -> str:
    return f"intermediate_representation_{i}"


class Component:
    """Base component: no loss, no action. Subclasses override what they need."""

    needs_logits = False  # store the current logits in memory metadata
    needs_features = False  # store (what memory_features makes of) the intermediate representations

    def __init__(self, weight: float = 0.0, sample_new_memory_batch: bool = False) -> None:
        self.weight = float(weight)
        self.sample_new_memory_batch = bool(sample_new_memory_batch)

    @property
    def is_loss(self) -> bool:
        """True when this component adds a term to the loss (a loss with weight 0 adds none)."""
        return type(self).loss is not Component.loss and self.weight != 0.0

    def loss(
        self, outputs_memory: Tensor, batch_memory: MemoryBatch, intermediate_representation_memory: list[Tensor]
    ) -> Tensor:
        raise NotImplementedError

    @property
    def served_model(self) -> nn.Module | None:
        """A model this component wants served instead of the working model (CLS-ER's stable copy)."""
        return None

    def memory_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Metadata columns this component needs stored for new items, from their intermediate
        representations (detached); refreshed by the EMA like the stored logits."""
        return {}

    def required_memory_metadata(self) -> dict[str, tuple[int, ...] | None]:
        """Columns of ``memory_features`` that a loaded memory must hold (None: any per-item shape)."""
        return {}

    def on_model_update_start(self, model: nn.Module, task_id: str) -> None:
        pass

    def on_train_start(self, model: nn.Module) -> None:
        pass

    def on_train_batch_end(self, model: nn.Module) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        pass

    def on_load_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        pass


class WeightedCustomLossComponent(Component):
    """``weight * mean(loss_fn(outputs, stored targets))`` on memory items: ER's replay term and
    DER++'s beta term."""

    def __init__(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], weight: float, sample_new_memory_batch: bool
    ) -> None:
        super().__init__(weight, sample_new_memory_batch)
        self.loss_fn = loss_fn

    def loss(
        self, outputs_memory: Tensor, batch_memory: MemoryBatch, intermediate_representation_memory: list[Tensor]
    ) -> Tensor:
        return self.weight * self.loss_fn(outputs_memory, batch_memory.targets).mean()


class WeightedMeanSquaredErrorLossComponent(Component):
    """``weight * mean((z - z_stored)^2)`` over items and classes: DER's alpha term, with the
    logits ``z_stored`` recorded when the item entered the memory (refreshed by the EMA)."""

    needs_logits = True

    def loss(
        self, outputs_memory: Tensor, batch_memory: MemoryBatch, intermediate_representation_memory: list[Tensor]
    ) -> Tensor:
        return self.weight * F.mse_loss(outputs_memory.float(), batch_memory.metadata[LOGITS])


POD_TYPES = ("spatial", "channel", "width", "height", "gap", "flat", "pixel")


def pod_pool(h: Tensor, distillation_type: str) -> Tensor:
    """PODNet's pooling of squared activations, flattened per sample.

    Feature maps are (B, C, H, W); a fully connected layer's (B, D) activations are treated as
    (B, D, 1, 1), so its 'spatial' vector is its squared activations (twice). Every type pools the
    squared activations, as PODNet's code does: ``spatial`` = [sum over H, sum over W] (pod-spatial);
    ``width`` = sum over H (a C x W vector, PODNet's pod-width); ``height`` = sum over W (C x H);
    ``channel`` = sum over C; ``gap`` = mean over H and W; ``flat`` = no pooling; ``pixel`` (the
    spec's name for no pooling: every squared activation is compared) is ``flat``.
    """
    if h.dim() == 2:
        h = h[:, :, None, None]
    if h.dim() != 4:
        raise ValueError(f"POD needs features of shape (B, D) or (B, C, H, W), got {tuple(h.shape)}")
    a = h.float().pow(2)
    if distillation_type == "spatial":
        return torch.cat([a.sum(dim=2).flatten(1), a.sum(dim=3).flatten(1)], dim=1)
    if distillation_type == "width":
        return a.sum(dim=2).flatten(1)
    if distillation_type == "height":
        return a.sum(dim=3).flatten(1)
    if distillation_type == "channel":
        return a.sum(dim=1).flatten(1)
    if distillation_type == "gap":
        return a.mean(dim=(2, 3))
    if distillation_type in ("flat", "pixel"):
        return a.flatten(1)
    raise ValueError(f"distillation_type {distillation_type!r} unknown; choose one of {', '.join(POD_TYPES)}")


def pod_feature_name(i: int, distillation_type: str) -> str:
    """Memory metadata column of layer ``i``'s pooled representation (the type is part of the name,
    so a state pooled for another ``distillation_type`` is refused as missing its columns)."""
    return f"pod_{distillation_type}_{i}"


def _one_by_one(h: Tensor) -> bool:
    return h.dim() == 2 or (h.dim() == 4 and h.shape[2] == 1 and h.shape[3] == 1)


def pod_memory_vector(h: Tensor, distillation_type: str) -> Tensor:
    """What the memory keeps of layer features ``h``: ``pod_pool(h, distillation_type)``, except that
    for ``spatial`` on 1x1 maps (a fully connected layer) whose two halves are equal, one half."""
    pooled = pod_pool(h, distillation_type)
    if distillation_type == "spatial" and _one_by_one(h):
        return pooled[:, : pooled.shape[1] // 2]
    return pooled


def pod_loss_pooled(
    current: list[Tensor], stored_pooled: list[Tensor], distillation_type: str = "spatial", normalize: bool = True
) -> Tensor:
    """``pod_loss`` against stored representations that are already pooled (``pod_pool`` or the
    memory's ``pod_memory_vector``)."""
    if not current:
        raise ValueError(
            "POD needs intermediate representations, but the model exposes none: name the layers to distil "
            "with the option feature_layers=[...] (submodule names)"
        )
    if len(current) != len(stored_pooled):
        raise ValueError(f"POD: the model exposes {len(current)} layers but the memory stores {len(stored_pooled)}")
    total = current[0].new_zeros((), dtype=torch.float32)
    for h_cur, b in zip(current, stored_pooled, strict=True):
        a = pod_pool(h_cur, distillation_type)
        if distillation_type == "spatial" and _one_by_one(h_cur) and 2 * b.shape[-1] == a.shape[-1]:
            b = torch.cat([b, b], dim=1)  # stored as one of its two equal halves (pod_memory_vector)
        if a.shape != b.shape:
            raise ValueError(
                f"POD: a layer pools to {tuple(a.shape[1:])} values per item, the memory stores {tuple(b.shape[1:])}"
            )
        if normalize:
            a, b = F.normalize(a, dim=1, p=2), F.normalize(b, dim=1, p=2)
        total = total + torch.linalg.vector_norm(a - b, dim=1).mean()
    return total / len(current)


def pod_loss(
    current: list[Tensor], stored: list[Tensor], distillation_type: str = "spatial", normalize: bool = True
) -> Tensor:
    """Mean over layers of the mean over samples of ||pool(current) - pool(stored)||_2 (raw feature maps)."""
    if not current:
        return pod_loss_pooled(current, [], distillation_type, normalize)  # raises: the model exposes none
    return pod_loss_pooled(current, [pod_pool(h, distillation_type) for h in stored], distillation_type, normalize)


class WeightedPooledOutputDistillationLossComponent(Component):
    """``weight * POD`` between the current and the stored intermediate representations.

    The memory keeps what the loss compares, ``pod_memory_vector(h, distillation_type)`` of each
    layer (for ``spatial`` a C x (H + W) vector instead of the C x H x W map; C values for a fully
    connected layer), so the loss equals the raw-map computation exactly; the EMA refresh
    (``ema_memory_update_gamma``) averages these pooled vectors.
    """

    needs_features = True

    def __init__(
        self,
        weight: float,
        sample_new_memory_batch: bool,
        distillation_type: str = "spatial",
        normalize: bool | int = True,
    ) -> None:
        super().__init__(weight, sample_new_memory_batch)
        if distillation_type not in POD_TYPES:
            raise ValueError(f"distillation_type {distillation_type!r} unknown; choose one of {', '.join(POD_TYPES)}")
        self.distillation_type = distillation_type
        self.normalize = bool(normalize)

    def memory_features(self, features: list[Tensor]) -> dict[str, Tensor]:
        """The metadata columns to store for new items: each layer's pooled representation."""
        return {
            pod_feature_name(i, self.distillation_type): pod_memory_vector(f, self.distillation_type)
            for i, f in enumerate(features)
        }

    def required_memory_metadata(self) -> dict[str, tuple[int, ...] | None]:
        return {pod_feature_name(0, self.distillation_type): None}  # the layer count shows in a forward pass

    def loss(
        self, outputs_memory: Tensor, batch_memory: MemoryBatch, intermediate_representation_memory: list[Tensor]
    ) -> Tensor:
        stored = [
            batch_memory.metadata[pod_feature_name(i, self.distillation_type)]
            for i in range(len(intermediate_representation_memory))
            if pod_feature_name(i, self.distillation_type) in batch_memory.metadata
        ]
        return self.weight * pod_loss_pooled(
            intermediate_representation_memory, stored, self.distillation_type, self.normalize
        )


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``target = decay * target + (1 - decay) * source`` for parameters and float buffers; other
    buffers (BatchNorm's step counter) are copied. Runs after every step of CLS-ER: one multi-tensor
    (``_foreach``) multiply and add per group, the same arithmetic as per-tensor ``mul_``/``add_``."""
    targets, sources = list(target.parameters()), list(source.parameters())
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        if t.dtype.is_floating_point:
            targets.append(t)
            sources.append(s)
        else:
            t.copy_(s)
    if len(targets) != len(sources):
        raise ValueError(f"EMA between models with {len(targets)} and {len(sources)} parameters and float buffers")
    if targets:
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, sources, alpha=1.0 - decay)


class WeightedCLSLossComponent(Component):
    """CLS-ER's consistency term (Arani et al., ICLR 2022).

    A plastic and a stable copy of the working model are kept as exponential moving averages.
    For each memory item the teacher is the copy whose softmax gives the true class the higher
    probability; the term is ``weight * mean((z_working - z_teacher)^2)``. After each optimizer
    step, with probability ``plastic_model_update_probability`` (resp. stable) the copy becomes
    ``d * copy + (1 - d) * working`` with ``d = min(1 - 1 / (step + 1), update_weight)``, ``step``
    counting optimizer steps over all updates. The copies run in eval mode. The stable copy is
    the model CLS-ER predicts with.
    """

    def __init__(
        self,
        weight: float,
        sample_new_memory_batch: bool,
        model: nn.Module,
        plastic_model_update_weight: float = 0.999,
        stable_model_update_weight: float = 0.999,
        plastic_model_update_probability: float = 0.9,
        stable_model_update_probability: float = 0.7,
        seed: int = 0,
    ) -> None:
        super().__init__(weight, sample_new_memory_batch)
        for name, p in [
            ("plastic_model_update_probability", plastic_model_update_probability),
            ("stable_model_update_probability", stable_model_update_probability),
            ("plastic_model_update_weight", plastic_model_update_weight),
            ("stable_model_update_weight", stable_model_update_weight),
        ]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
        self.plastic_model_update_weight = plastic_model_update_weight
        self.stable_model_update_weight = stable_model_update_weight
        self.plastic_model_update_probability = plastic_model_update_probability
        self.stable_model_update_probability = stable_model_update_probability
        self.plastic_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.stable_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step = 0
        self.task_id: str | None = None

    def loss(
        self, outputs_memory: Tensor, batch_memory: MemoryBatch, intermediate_representation_memory: list[Tensor]
    ) -> Tensor:
        with torch.no_grad():
            stable = self.stable_model(batch_memory.inputs, self.task_id)
            plastic = self.plastic_model(batch_memory.inputs, self.task_id)
            y = batch_memory.targets.unsqueeze(1)
            stable_p = stable.float().softmax(1).gather(1, y)
            plastic_p = plastic.float().softmax(1).gather(1, y)
            teacher = torch.where(stable_p > plastic_p, stable, plastic)
        return self.weight * F.mse_loss(outputs_memory.float(), teacher.float())

    def on_train_batch_end(self, model: nn.Module) -> None:
        self.step += 1
        draws = torch.rand(2, generator=self.generator).tolist()  # CPU generator: no device sync
        if draws[0] < self.plastic_model_update_probability:
            ema_update(self.plastic_model, model, min(1.0 - 1.0 / (self.step + 1), self.plastic_model_update_weight))
        if draws[1] < self.stable_model_update_probability:
            ema_update(self.stable_model, model, min(1.0 - 1.0 / (self.step + 1), self.stable_model_update_weight))

    @property
    def served_model(self) -> nn.Module:
        return self.stable_model

    def on_model_update_start(self, model: nn.Module, task_id: str) -> None:
        """Gives the copies a head for a new task id (initialised from the working model's)."""
        self.task_id = task_id
        for copy_model in (self.plastic_model, self.stable_model):
            if task_id in copy_model.task_ids:
                continue
            if task_id in model.heads:
                copy_model.heads[task_id] = copy.deepcopy(model.heads[task_id]).requires_grad_(False)
            else:  # a plain nn.Module: one output layer shared by every task id
                copy_model.add_task_params(task_id)

    def on_save_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        checkpoint["json"][f"{prefix}step"] = self.step
        checkpoint["tensors"][f"{prefix}generator_state"] = self.generator.get_state().clone()
        for name, m in (("plastic_model", self.plastic_model), ("stable_model", self.stable_model)):
            for key, value in m.state_dict().items():
                checkpoint["tensors"][f"{prefix}{name}.{key}"] = value

    def on_load_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        self.step = int(checkpoint["json"][f"{prefix}step"])
        self.generator.set_state(checkpoint["tensors"][f"{prefix}generator_state"].to(torch.uint8))
        for name, m in (("plastic_model", self.plastic_model), ("stable_model", self.stable_model)):
            for task_id in _head_ids(checkpoint["tensors"], f"{prefix}{name}."):
                if task_id not in m.heads:
                    m.add_task_params(task_id)
            state = {
                k[len(prefix) + len(name) + 1 :]: v
                for k, v in checkpoint["tensors"].items()
                if k.startswith(f"{prefix}{name}.")
            }
            m.load_state_dict(state, strict=True)


def _head_ids(tensors: dict[str, Any], prefix: str) -> list[str]:
    ids = []
    for key in tensors:
        if key.startswith(prefix + "heads."):
            task_id = key[len(prefix) + len("heads.") :].split(".")[0]
            if task_id not in ids:
                ids.append(task_id)
    return ids


class ShrinkAndPerturbReinitializationComponent(Component):
    """Shrink and perturb (Ash & Adams, NeurIPS 2020): when an update starts, every parameter
    becomes ``shrink_factor * w + N(0, sigma^2)`` noise."""

    def __init__(self, shrink_factor: float, sigma: float, seed: int = 0) -> None:
        super().__init__(weight=0.0, sample_new_memory_batch=False)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        self.shrink_factor = float(shrink_factor)
        self.sigma = float(sigma)
        self.generator = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def on_train_start(self, model: nn.Module) -> None:
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
            p.mul_(self.shrink_factor).add_(noise, alpha=self.sigma)

    def on_save_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        checkpoint["tensors"][f"{prefix}generator_state"] = self.generator.get_state().clone()

    def on_load_checkpoint(self, checkpoint: Checkpoint, prefix: str) -> None:
        self.generator.set_state(checkpoint["tensors"][f"{prefix}generator_state"].to(torch.uint8))

