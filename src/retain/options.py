"""The training options every updater and learner shares, defined once.

The spec's updaters repeat ~25 keyword arguments in every signature. Here they live in one
dataclass: every updater and learner takes them as ``**options`` and builds a
``TrainingOptions``, which validates them before any training time is spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from retain.batching import LoaderOptions

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "single_device")
PRECISIONS = ("32", "32-true", "64", "64-true", "16-mixed", "bf16-mixed")
SCHEDULER_INTERVALS = ("epoch", "step")
MODES = ("min", "max")
CLIP_ALGORITHMS = (None, "norm", "value")


@dataclass
class TrainingOptions:
    """Options of the spec's updaters that are not specific to a method.

    Transforms are callables on *batched* tensors (B, ...) that run on the training device
    (the spec's per-item torchvision transforms would force a per-item loop on the CPU).
    ``buffer_transform`` defaults to ``train_transform``: memory items are stored raw, as the
    new data arrives, and must be made model-ready the same way.
    ``logger`` is any object with ``log_metrics(metrics: dict, step: int)`` (Lightning's loggers
    fit); ``None`` logs nothing. The spec's TensorBoard default needs tensorboard, which retain
    does not require.
    """

    learning_rate_scheduler: Callable[..., Any] | None = None
    learning_rate_scheduler_interval: str = "epoch"
    batch_size: int = 32
    max_epochs: int = 50
    train_transform: Callable | None = None
    train_target_transform: Callable | None = None
    test_transform: Callable | None = None
    test_target_transform: Callable | None = None
    buffer_transform: Callable | None = None
    buffer_target_transform: Callable | None = None
    metric: str | None = None
    mode: str = "min"
    logged_metrics: dict[str, Any] | None = None
    early_stopping_enabled: bool = False
    logger: Any = None
    accelerator: str = "auto"
    devices: int | None = None
    strategy: str = "ddp"
    precision: str = "32"
    seed: int | None = 0
    deterministic_trainer: bool = False
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    mask_unused_classes: bool = False
    # retain's own additions (not in the spec)
    log_every_n_steps: int = 50
    progress_bar: bool = False
    checkpoint_every_n_epochs: int = 0
    # --- data loading and models of any structure (issue 12) ---
    # DataLoader settings for datasets that are not tensor-backed (TensorDatasets stay on the
    # on-device fast path); a user's DataLoader supplies them where these are left at defaults.
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    # With mask_unused_classes: the classes of this update's data, declared; None reads them
    # from the labels (a `targets` attribute, else streamed batch by batch, inputs not kept).
    update_classes: list[int] | None = None
    # Names of submodules (``model.get_submodule(name)``) whose outputs POD distils, captured by
    # forward hooks; None keeps the model's own (the shipped models' defaults).
    feature_layers: list[str] | None = None
    # Pad value per input leaf path (e.g. {"input_ids": pad_token_id}) with which the replay memory
    # and the join of new and replayed batches pad variable-length leaves; unlisted leaves pad with 0.
    pad_values: dict[str, float] | None = None
    # --- end of issue 12 options ---
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_choice("learning_rate_scheduler_interval", self.learning_rate_scheduler_interval, SCHEDULER_INTERVALS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("accelerator", self.accelerator, ACCELERATORS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        self.precision = str(self.precision)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("max_epochs", self.max_epochs)
        _check_positive_int("log_every_n_steps", self.log_every_n_steps)
        if self.devices is not None:
            _check_positive_int("devices", self.devices)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        if self.early_stopping_enabled and self.metric is None:
            raise ValueError("early_stopping_enabled needs a `metric` to monitor (e.g. 'val_loss')")
        if self.checkpoint_every_n_epochs < 0:
            raise ValueError("checkpoint_every_n_epochs must be >= 0")
        self._check_loading_options()

    def _check_loading_options(self) -> None:
        """Validates the issue-12 options (loaders, declared classes, feature layers)."""
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0")
        if self.update_classes is not None:
            classes = list(self.update_classes)
            if not classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes):
                raise ValueError(f"update_classes must be a non-empty list of class indices >= 0, got {classes!r}")
            self.update_classes = sorted(set(classes))
        if self.feature_layers is not None:
            layers = list(self.feature_layers)
            if not layers or not all(isinstance(n, str) and n for n in layers):
                raise ValueError(f"feature_layers must be a non-empty list of submodule names, got {layers!r}")
            self.feature_layers = layers
        pads = self.pad_values
        if pads is not None and (not isinstance(pads, dict) or not all(_is_pad(k, v) for k, v in pads.items())):
            raise ValueError(f"pad_values must map input leaf paths to numbers, got {self.pad_values!r}")

    def loader_options(self) -> LoaderOptions:
        """The DataLoader settings for ``retain.batching``."""
        return LoaderOptions(self.num_workers, self.pin_memory, self.persistent_workers)

    @classmethod
    def from_kwargs(cls, owner: str, **kwargs: Any) -> TrainingOptions:
        """Builds options from keyword arguments, naming ``owner`` and the choices on a typo."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"{owner} got unknown option(s) {', '.join(unknown)}; "
                f"valid training options are: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (callables by their repr), for manifests and reports."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value if _is_json_scalar(value) else repr(value)
        return out


def _is_pad(path: Any, value: Any) -> bool:
    return isinstance(path, str) and isinstance(value, int | float) and not isinstance(value, bool)


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not supported; choose one of {shown}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
