"""The continual model base: task heads, intermediate features, rebuildable without pickle.

``ContinualModel`` is retain's name for the spec's ``RenateModule`` (the alias ``RenateModule``
is exported too). A subclass implements ``get_features`` (the backbone) and sets
``num_features``/``num_outputs``; the base adds one linear head per task id on demand.
Constructor arguments are recorded automatically, so a state folder stores the model as
``{class name, JSON hyperparameters, tensors}`` and rebuilds it through the registry of allowed
classes instead of unpickling code.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any

from torch import Tensor, nn

DEFAULT_TASK_ID = "default_task"
_TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
_MODEL_REGISTRY: dict[str, type[ContinualModel]] = {}


def register_model(cls: type[ContinualModel]) -> type[ContinualModel]:
    """Class decorator: allow state folders to rebuild ``cls`` by name."""
    if not (isinstance(cls, type) and issubclass(cls, ContinualModel)):
        raise TypeError(f"only ContinualModel subclasses can be registered, got {cls!r}")
    existing = _MODEL_REGISTRY.get(cls.__name__)
    if existing is not None and existing is not cls:
        raise ValueError(f"a different model class named {cls.__name__!r} is already registered")
    _MODEL_REGISTRY[cls.__name__] = cls
    return cls


def registered_models() -> dict[str, type[ContinualModel]]:
    return dict(_MODEL_REGISTRY)


def build_model(class_name: str, hyperparameters: dict[str, Any]) -> ContinualModel:
    """Instantiates a registered model class from JSON hyperparameters."""
    cls = _MODEL_REGISTRY.get(class_name)
    if cls is None:
        raise ValueError(
            f"model class {class_name!r} is not registered; known: {', '.join(sorted(_MODEL_REGISTRY))}. "
            "Decorate your class with @retain.register_model."
        )
    return cls(**hyperparameters)


class ContinualModel(nn.Module):
    """A backbone with one output head per task id (the spec's ``RenateModule``).

    ``forward(x, task_id=None)`` returns the logits of ``task_id``'s head (the default head when
    ``None``). Every forward first clears the intermediate-representation cache, so
    ``get_intermediate_representation()`` always holds the features of the last forward pass.
    """

    num_features: int
    num_outputs: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        original_init = cls.__init__
        signature = inspect.signature(original_init)

        @functools.wraps(original_init)
        def init(self: ContinualModel, *args: Any, **kw: Any) -> None:
            if not hasattr(self, "_hyperparameters_owner"):
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                params = dict(bound.arguments)
                params.pop("self")
                for name, p in signature.parameters.items():
                    if p.kind is inspect.Parameter.VAR_KEYWORD and name in params:
                        params.update(params.pop(name))
                    elif p.kind is inspect.Parameter.VAR_POSITIONAL:
                        params.pop(name, None)
                object.__setattr__(self, "_hyperparameters_owner", cls)
                object.__setattr__(self, "_pending_hyperparameters", _json_hyperparameters(cls.__name__, params))
            original_init(self, *args, **kw)
            if getattr(self, "_hyperparameters_owner", None) is cls:
                self._hyperparameters = self.__dict__.pop("_pending_hyperparameters")

        cls.__init__ = init  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        self._intermediate_representation_cache: list[Tensor] = []
        self._feature_layers: list[str] = []
        self._hooked_features: list[Tensor | None] = []

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, as JSON-able values."""
        return dict(getattr(self, "_hyperparameters", {}))

    def get_features(self, x: Tensor) -> Tensor:
        """The backbone: inputs to penultimate features. Subclasses append the outputs of the
        layers they expose to ``self._intermediate_representation_cache``."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Re-initialises every layer (drawing from the global generator), as a fresh model would be."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def make_head(self) -> nn.Module:
        return nn.Linear(self.num_features, self.num_outputs)

    def add_task_params(self, task_id: str | None = None) -> None:
        """Adds an output head for ``task_id`` unless it has one."""
        task_id = task_id or DEFAULT_TASK_ID
        if not isinstance(task_id, str) or not _TASK_ID_PATTERN.match(task_id):
            raise ValueError(f"task_id must be a non-empty string of letters, digits, '_' or '-', got {task_id!r}")
        if task_id not in self.heads:
            head = self.make_head()
            ref = next(self.parameters(), None)
            if ref is not None:
                head = head.to(device=ref.device, dtype=ref.dtype)
            self.heads[task_id] = head

    @property
    def task_ids(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: Tensor, task_id: str | None = None) -> Tensor:
        self._intermediate_representation_cache = []
        if self._feature_layers:
            self._hooked_features = [None] * len(self._feature_layers)
        head = self.heads[task_id or DEFAULT_TASK_ID]
        return head(self.get_features(x))

    def feature_root(self) -> nn.Module:
        """The module whose submodule names ``use_feature_layers`` resolves (the model itself)."""
        return self

    @property
    def feature_layers(self) -> list[str]:
        """The submodules whose outputs are the intermediate representations ([]: ``get_features``)."""
        return list(self._feature_layers)

    def use_feature_layers(self, names: list[str]) -> None:
        """Takes the intermediate representations (for POD) from the outputs of the submodules
        ``names`` of ``feature_root()``, captured by forward hooks, in the order given, instead
        of what ``get_features`` appends. A submodule returning a tuple gives its first tensor."""
        root = self.feature_root()
        for module in root.modules():  # drop hooks of an earlier call (or of an earlier wrapper of the module)
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _CaptureFeature):
                    del module._forward_hooks[key]
        for i, name in enumerate(names):
            try:
                submodule = root.get_submodule(name)
            except AttributeError:
                known = [n for n, _ in root.named_modules() if n][:8]
                raise ValueError(
                    f"feature_layers: {type(root).__name__} has no submodule {name!r} (it has e.g. {', '.join(known)})"
                ) from None
            submodule.register_forward_hook(_CaptureFeature(self, i, name))
        self._feature_layers = list(names)
        self._hooked_features = [None] * len(names)

    def get_params(self, task_id: str | None = None) -> list[nn.Parameter]:
        """The parameters of the shared layers plus those of ``task_id``'s head (the spec's
        ``RenateModule.get_params``): what an optimizer of one task's update should see."""
        key = task_id or DEFAULT_TASK_ID
        if key not in self.heads:
            raise KeyError(f"no head for task id {key!r}; the model has {self.task_ids} (add_task_params adds one)")
        in_heads = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in in_heads] + list(self.heads[key].parameters())

    def get_logits(self, x: Tensor, task_id: str | None = None) -> Tensor:
        return self(x, task_id)

    def get_intermediate_representation(self) -> list[Tensor]:
        """The features of the exposed layers from the last forward pass (POD distils them): the
        hooked ``feature_layers`` when set, else what ``get_features`` appended."""
        if self._feature_layers:
            missing = [n for n, t in zip(self._feature_layers, self._hooked_features, strict=True) if t is None]
            if missing:
                raise ValueError(f"feature_layers {missing} produced no output in the last forward pass")
            return list(self._hooked_features)  # type: ignore[arg-type]
        return self._intermediate_representation_cache

    def reset_intermediate_representation_cache(self) -> None:
        self._intermediate_representation_cache = []
        self._hooked_features = [None] * len(self._feature_layers)

    def describe(self) -> dict[str, Any]:
        """Class name, hyperparameters and task ids: what a state folder needs to rebuild it."""
        return {"class": type(self).__name__, "hyperparameters": self.hyperparameters, "task_ids": self.task_ids}


class _CaptureFeature:
    """Forward hook storing a submodule's output as intermediate representation ``index`` of
    ``owner`` (an object, not a closure, so that deep copies of the model hook their own copy)."""

    def __init__(self, owner: ContinualModel, index: int, name: str) -> None:
        self.owner = owner
        self.index = index
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        tensor = output
        if not isinstance(tensor, Tensor):
            tensor = getattr(output, "last_hidden_state", None)
        if tensor is None and isinstance(output, tuple | list):
            tensor = next((t for t in output if isinstance(t, Tensor)), None)
        if not isinstance(tensor, Tensor):
            kind = type(output).__name__
            raise ValueError(f"feature_layers: submodule {self.name!r} returned a {kind}, not a tensor")
        hooked = self.owner._hooked_features
        if len(hooked) != len(self.owner._feature_layers):  # forward not through owner.forward
            hooked = self.owner._hooked_features = [None] * len(self.owner._feature_layers)
        hooked[self.index] = tensor


def rebuild_model(description: dict[str, Any]) -> ContinualModel:
    """Inverse of ``ContinualModel.describe`` (weights are loaded separately)."""
    model = build_model(description["class"], description["hyperparameters"])
    for task_id in description["task_ids"]:
        model.add_task_params(task_id)
    return model


def _json_hyperparameters(owner: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        # allow_nan=False: the manifest is written without NaN/Inf, so refuse them here, before training
        return json.loads(json.dumps(params, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{owner}'s constructor arguments must be JSON values (numbers, strings, lists, dicts) "
            f"so that a state folder can rebuild the model without pickle: {err}"
        ) from None


RenateModule = ContinualModel
