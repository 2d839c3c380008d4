"""Any ``nn.Module`` as a continual model: ``PlainModuleAdapter`` and the helpers around it.

A plain module's ``forward`` takes the inputs (tensor -> ``m(x)``, tuple -> ``m(*x)``, dict ->
``m(**x)``, see ``retain.nested.call_model``) and returns logits, or an object with ``.logits``
(HuggingFace). The updaters wrap such a module in a ``PlainModuleAdapter`` so that every learner
sees the ``ContinualModel`` interface; what the user gets back (from ``update`` and
``load_model``) is their own module.

What a plain module gives up: it has ONE output layer, its own, shared by every task id (no
task-incremental heads are added), and a state folder cannot rebuild it alone: it records the
class name and the weights (names, shapes, dtypes), and is loaded into a fresh module that the
caller builds (``retain.load_model(folder, model=fresh)``, the config's ``model_fn`` in the CLI).
Intermediate representations for POD come from ``feature_layers`` (forward hooks on named
submodules). A ``ContinualModel`` subclass, registered with ``@retain.register_model``, keeps
per-task heads and is rebuilt from the state folder alone.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor, nn

import retain.nested as nested
from retain.models.base import _TASK_ID_PATTERN, DEFAULT_TASK_ID, ContinualModel

PLAIN_MODULE_MARKER = "plain_nn_module"


class PlainModuleAdapter(ContinualModel):
    """A plain ``nn.Module`` behind the ``ContinualModel`` interface (not registered: the state
    folder stores its weights, and a fresh module of the same class is needed to load them).

    ``state_dict``/``load_state_dict`` are the wrapped module's own (same names as the user's
    module), so ``model.safetensors`` holds exactly the user's weights. ``num_outputs`` is the
    module's ``config.num_labels`` when it has one (HuggingFace), else the ``out_features`` of its
    last ``nn.Linear``, and is corrected by every forward pass.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, ContinualModel):
            raise TypeError("PlainModuleAdapter wraps plain nn.Modules; a ContinualModel is used as it is")
        self.module = module
        self._task_ids: list[str] = []
        self.num_outputs = _guess_num_outputs(module)
        self.num_features = 0

    def feature_root(self) -> nn.Module:
        return self.module

    def forward(self, x: Any, task_id: str | None = None) -> Tensor:
        self._intermediate_representation_cache = []
        if self._feature_layers:
            self._hooked_features = [None] * len(self._feature_layers)
        out = nested.call_model(self.module, x)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{type(self.module).__name__}.forward returned a {type(out).__name__}; a model must return "
                "logits (B, C) or an object with .logits"
            )
        if out.dim() == 2 and out.shape[-1] != self.num_outputs:
            self.num_outputs = int(out.shape[-1])
        return out

    def add_task_params(self, task_id: str | None = None) -> None:
        """Records ``task_id``: every task id shares the module's one output layer."""
        task_id = task_id or DEFAULT_TASK_ID
        if task_id not in self._task_ids:
            _validate_task_id(task_id)
            self._task_ids.append(task_id)

    @property
    def task_ids(self) -> list[str]:
        return list(self._task_ids)

    def make_head(self) -> nn.Module:
        raise TypeError("a plain nn.Module has one output layer; write a ContinualModel for per-task heads")

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self.module).__name__,
            "hyperparameters": {PLAIN_MODULE_MARKER: True},
            "task_ids": self.task_ids,
        }


# The base class records constructor arguments as JSON hyperparameters; the wrapped module is not
# JSON and is not a hyperparameter, so the adapter keeps the undecorated constructor.
PlainModuleAdapter.__init__ = PlainModuleAdapter.__init__.__wrapped__  # type: ignore[attr-defined]


def _validate_task_id(task_id: Any) -> None:
    if not isinstance(task_id, str) or not _TASK_ID_PATTERN.match(task_id):
        raise ValueError(f"task_id must be a non-empty string of letters, digits, '_' or '-', got {task_id!r}")


def _guess_num_outputs(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    labels = getattr(config, "num_labels", None)
    if isinstance(labels, int) and labels > 0:
        return labels
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return int(last.out_features) if last is not None else 0


def is_plain_description(description: dict[str, Any]) -> bool:
    """True for the manifest's model entry of a plain module."""
    return description.get("hyperparameters") == {PLAIN_MODULE_MARKER: True}


def as_continual_model(model: nn.Module) -> ContinualModel:
    """``model`` itself when it is a ``ContinualModel``, else a ``PlainModuleAdapter`` around it."""
    if isinstance(model, ContinualModel):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch nn.Module (a retain ContinualModel or any module returning logits), "
            f"got {type(model).__name__}"
        )
    return PlainModuleAdapter(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module: the wrapped module of an adapter, else ``model``."""
    return model.module if isinstance(model, PlainModuleAdapter) else model


def forward_logits(model: nn.Module, inputs: Any, task_id: str | None = None) -> Tensor:
    """Logits of any model: ``model(x, task_id)`` for a ``ContinualModel`` or a module whose
    ``forward`` has a ``task_id`` parameter (given tensor inputs), else ``nested.call_model``."""
    if isinstance(model, ContinualModel):
        return model(inputs, task_id)
    if isinstance(inputs, Tensor) and _takes_task_id(type(model)):
        return model(inputs, task_id)
    return nested.call_model(model, inputs)


@functools.cache
def _takes_task_id(cls: type) -> bool:
    try:
        return "task_id" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["PlainModuleAdapter", "as_continual_model", "forward_logits", "is_plain_description", "unwrap"]
