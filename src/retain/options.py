"""The training options every updater and learner shares, defined once.

The spec's updaters repeat ~25 keyword arguments in every signature. Here they live in one
dataclass: every updater and learner takes them as ``**options`` and builds a
``TrainingOptions``, which validates them before any training time is spent.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from retain.batching import LoaderOptions
from retain.models.base import ContinualModel

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "single_device")
PRECISIONS = ("32", "32-true", "64", "64-true", "16-mixed", "bf16-mixed")
SCHEDULER_INTERVALS = ("epoch", "step")
MODES = ("min", "max")
CLIP_ALGORITHMS = (None, "norm", "value")
MASK_CLASS_SETS = ("current", "current_and_memory")
VALIDATION_DATA = ("all", "current")


@dataclass
class TrainingOptions:
    """Options of the spec's updaters that are not specific to a method.

    Transforms are callables on *batched* tensors (B, ...) that run on the training device
    (the spec's per-item torchvision transforms would force a per-item loop on the CPU).
    ``buffer_transform`` defaults to ``train_transform``: memory items are stored raw, as the
    new data arrives, and must be made model-ready the same way.

    Args:
        learning_rate_scheduler: callable on the optimizer returning a torch LR scheduler (None: constant LR).
        learning_rate_scheduler_interval: when the scheduler steps: after every 'epoch' or every 'step'.
        batch_size: items per optimizer step (new plus memory items for replay methods, unless memory_batch_size).
        max_epochs: passes over the update's data (the most, with early stopping).
        train_transform: batched transform of the training inputs, on the training device.
        train_target_transform: batched transform of the training targets.
        test_transform: batched transform of validation inputs.
        test_target_transform: batched transform of validation targets.
        buffer_transform: batched transform of memory inputs (default: train_transform).
        buffer_target_transform: batched transform of memory targets (default: train_target_transform).
        metric: validation metric that picks the epoch whose weights are kept (val_loss, val_accuracy or val_ plus a
            logged_metrics name); needs val data.
        mode: 'min' or 'max': whether a lower or a higher metric is better.
        logged_metrics: extra torchmetrics to compute on the validation data, by name (logged as val_NAME).
        early_stopping_enabled: stop when `metric` has not improved for `patience` epochs; needs `metric` and val data.
        patience: epochs without improvement of `metric` before early stopping (3, as Lightning's EarlyStopping).
        logger: object with log_metrics(metrics, step), e.g. lightning's TensorBoardLogger or CSVLogger (None: no
            logging).
        accelerator: 'auto' (CUDA if available, else CPU), 'cpu', 'gpu'/'cuda' or 'mps'.
        devices: number of processes/GPUs; more than 1 runs a DDP update (strategy 'ddp', 'ddp_spawn' or 'auto').
        strategy: 'ddp', 'ddp_spawn', 'auto' or None (multi-process with devices > 1), or 'single_device'.
        precision: '32', '64' (float64 weights and inputs), '16-mixed' or 'bf16-mixed' (autocast).
        seed: seed of everything the update draws: data order, memory sampling and writes, dropout, component noise
            (not the weights of the model you pass in); None draws one.
        deterministic_trainer: torch.use_deterministic_algorithms during the update (bit-identical reruns on GPU).
        gradient_clip_val: clip gradients at this norm/value (None: no clipping).
        gradient_clip_algorithm: 'norm' (default when clipping) or 'value'.
        mask_unused_classes: the loss on new data ignores the logits of classes outside `mask_class_set`.
        mask_class_set: classes kept by mask_unused_classes: 'current' (this update's classes, retain's default) or
            'current_and_memory' (plus the memory's classes, the spec's set).
        validation_data: what each update validates (and early-stops) on: 'all' (the spec's: this update's val_dataset
            plus the val data of every earlier update, kept in the state folder as one chunk per update) or 'current'
            (this update's val_dataset only; nothing is kept).
        log_every_n_steps: steps between two train_loss logs.
        progress_bar: show a progress bar per epoch.
        checkpoint_every_n_epochs: write a resumable checkpoint beside the output folder every N epochs (0: never).
        num_workers: DataLoader worker processes for datasets that are not tensor-backed (0: load in this process).
        pin_memory: DataLoader pin_memory, for faster copies of loaded batches to a GPU.
        persistent_workers: keep the DataLoader's workers alive between epochs (needs num_workers > 0).
        update_classes: with mask_unused_classes, this update's classes, declared (None: read from the labels).
        feature_layers: submodule names whose outputs POD distils, captured by forward hooks (None: the model's own).
        pad_values: pad value per input leaf path (e.g. {'input_ids': 0}) of variable-length leaves (others pad 0).
        memory_device: where the replay memory lives: 'same' (the training device), 'cpu' or 'pinned' host memory
            (only sampled batches are copied to the device), for memories larger than the accelerator's memory.
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
    strategy: str | None = "ddp"
    precision: str = "32"
    seed: int | None = 0
    deterministic_trainer: bool = False
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    mask_unused_classes: bool = False
    # retain's own additions (not in the spec)
    patience: int = 3
    mask_class_set: str = "current"
    validation_data: str = "all"
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
    memory_device: str = "same"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_choice("learning_rate_scheduler_interval", self.learning_rate_scheduler_interval, SCHEDULER_INTERVALS)
        check_choice("mode", self.mode, MODES)
        check_choice("accelerator", self.accelerator, ACCELERATORS)
        if self.strategy is None:  # Lightning's and the spec's "let the trainer choose"
            self.strategy = "auto"
        check_choice("strategy", self.strategy, STRATEGIES)
        self.precision = str(self.precision)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("mask_class_set", self.mask_class_set, MASK_CLASS_SETS)
        check_choice("validation_data", self.validation_data, VALIDATION_DATA)
        check_choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("max_epochs", self.max_epochs)
        _check_positive_int("log_every_n_steps", self.log_every_n_steps)
        if self.devices is not None:
            _check_positive_int("devices", self.devices)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        if self.strategy == "single_device" and (self.devices or 1) > 1:
            raise ValueError(
                f"strategy='single_device' trains on one device, but devices={self.devices}: "
                "use strategy='ddp' for several devices, or devices=1"
            )
        _check_positive_int("patience", self.patience)
        if self.early_stopping_enabled and self.metric is None:
            raise ValueError("early_stopping_enabled needs a `metric` to monitor (e.g. 'val_loss')")
        if self.metric is not None and self.metric not in self.metric_names():
            raise ValueError(
                f"metric={self.metric!r} is not computed; choose one of {', '.join(self.metric_names())}"
            )
        if self.logger is not None and not callable(getattr(self.logger, "log_metrics", None)):
            raise TypeError(
                f"logger must have a log_metrics(metrics, step) method (a Lightning logger fits), "
                f"got {type(self.logger).__name__}"
            )
        if self.checkpoint_every_n_epochs < 0:
            raise ValueError("checkpoint_every_n_epochs must be >= 0")
        self._check_loading_options()

    def _check_loading_options(self) -> None:
        """Validates the issue-12 options (loaders, declared classes, feature layers)."""
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.memory_device not in ("same", "cpu", "pinned"):
            raise ValueError(f"memory_device must be 'same', 'cpu' or 'pinned', got {self.memory_device!r}")
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

    @property
    def float64(self) -> bool:
        """True when ``precision`` asks for float64 weights and inputs."""
        return self.precision in ("64", "64-true")

    def metric_names(self) -> list[str]:
        """The validation metrics an update computes (what ``metric`` may name)."""
        return ["val_loss", "val_accuracy", *(f"val_{name}" for name in (self.logged_metrics or {}))]

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


SEED_STRIDE = 1_000_003  # a prime; seed * SEED_STRIDE + u differs for every (seed, u) with u < SEED_STRIDE


def update_seed(seed: int, updates_done: int) -> int:
    """The seed of update number ``updates_done`` of a learner seeded ``seed`` (global generators,
    the data shards of a multi-process update)."""
    return seed * SEED_STRIDE + updates_done


def _is_pad(path: Any, value: Any) -> bool:
    return isinstance(path, str) and isinstance(value, int | float) and not isinstance(value, bool)


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuses ``value`` unless it is one of ``choices``, in one line naming the option and every choice."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not supported; choose one of {shown}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------- signatures from one definition
_ARG_LINE = re.compile(r"^\s{4,}(\w+)(?: \([^)]*\))?:\s+(.*)$")


def option_docs(*classes: type) -> dict[str, str]:
    """What each option does, read from the ``Args:`` sections of the docstrings of ``classes``
    and their bases (the first class that documents a name wins). The docstring is the one place
    an option's meaning is written: ``help()``, the generated updater docstrings and ``retain
    benchmark --method X --help`` all read it from there."""
    docs: dict[str, str] = {}
    seen: set[str] = set()  # names documented by an earlier class: their continuation lines are skipped
    for cls in classes:
        for klass in inspect.getmro(cls) if inspect.isclass(cls) else (cls,):
            text = inspect.cleandoc(klass.__doc__ or "")
            in_args, current = False, None
            for line in text.splitlines():
                if line.strip() in ("Args:", "Parameters:"):
                    in_args, current = True, None
                    continue
                if not in_args:
                    continue
                if line and not line.startswith(" "):
                    in_args = False
                    continue
                match = _ARG_LINE.match(line)
                if match and len(line) - len(line.lstrip()) == 4:
                    current = match.group(1)
                    docs.setdefault(current, match.group(2).strip())
                elif current is not None and line.strip() and current not in seen:
                    docs[current] += " " + line.strip()
            seen.update(docs)
    return docs


def training_option_parameters(**default_overrides: Any) -> list[inspect.Parameter]:
    """Every ``TrainingOptions`` field as a keyword-only parameter (with its default and type)."""
    hints = typing.get_type_hints(TrainingOptions)
    parameters = []
    for f in dataclasses.fields(TrainingOptions):
        if f.name == "extra":
            continue
        default = default_overrides.get(f.name, f.default)
        parameters.append(inspect.Parameter(f.name, KEYWORD_ONLY, default=default, annotation=hints[f.name]))
    return parameters


TRAINING_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(TrainingOptions)) - {"extra"}


def install_signature(
    cls: type,
    parameters: list[inspect.Parameter],
    build: Callable[..., None],
    docs: dict[str, str],
) -> None:
    """Gives ``cls`` an ``__init__`` with the real signature ``parameters`` (for ``help()``,
    ``inspect.signature`` and IDEs that introspect) and a docstring listing every option.

    The arguments are bound against the signature, so a positional argument too many or an
    unknown keyword fails loudly (naming every valid option and the closest match), and
    ``build(self, **arguments)`` receives every parameter by name.
    """
    signature = inspect.Signature([inspect.Parameter("self", POSITIONAL_OR_KEYWORD), *parameters])
    names = [p.name for p in parameters]
    positional = [p.name for p in parameters if p.kind is POSITIONAL_OR_KEYWORD]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:
            unknown = sorted(set(kwargs) - set(names))
            hint = ""
            if unknown:
                close = difflib.get_close_matches(unknown[0], names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problem = f"got unknown option(s) {', '.join(unknown)}{hint}"
            elif len(args) > len(positional):
                problem = (
                    f"takes at most {len(positional)} positional arguments ({', '.join(positional)}), "
                    f"got {len(args)}: pass the others by name"
                )
            else:
                problem = str(err)
            raise TypeError(f"{cls.__name__} {problem}; valid options are: {', '.join(sorted(names))}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        build(self, **arguments)

    summary = inspect.cleandoc(cls.__doc__ or cls.__name__).split("\n\n")[0]
    lines = [summary, "", "Args:"]
    for p in parameters:
        default = "" if p.default is inspect.Parameter.empty else f" (default {p.default!r})"
        lines.append(f"    {p.name}: {docs.get(p.name, '(undocumented)')}{default}")
    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = "\n".join(lines)
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    cls.__init__ = __init__  # type: ignore[misc]


POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY


class UpdaterArguments:
    """The arguments every updater takes besides its options (documentation only).

    Args:
        model: the retain.ContinualModel to update (its weights are replaced by input_state_folder's).
        loss_fn: per-item loss on (logits, targets), reduction='none' (default: cross-entropy).
        optimizer: callable on the parameters returning an optimizer, e.g. functools.partial(torch.optim.SGD, lr=0.05).
        input_state_folder: state folder written by the previous update (None for the first update).
        output_state_folder: where this update writes the new state folder, atomically (None: nothing is written).
    """


def model_arguments() -> list[inspect.Parameter]:
    """``model, loss_fn, optimizer``: the first positional arguments of every updater (the spec's)."""
    return [
        inspect.Parameter("model", POSITIONAL_OR_KEYWORD, annotation=ContinualModel),
        inspect.Parameter("loss_fn", POSITIONAL_OR_KEYWORD, default=None, annotation="nn.Module | None"),
        inspect.Parameter("optimizer", POSITIONAL_OR_KEYWORD, default=None, annotation="Callable | None"),
    ]


def state_folder_arguments() -> list[inspect.Parameter]:
    """``input_state_folder, output_state_folder``: keyword-only arguments of every updater."""
    return [
        inspect.Parameter("input_state_folder", KEYWORD_ONLY, default=None, annotation="str | Path | None"),
        inspect.Parameter("output_state_folder", KEYWORD_ONLY, default=None, annotation="str | Path | None"),
    ]
