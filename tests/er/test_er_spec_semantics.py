"""Where a user of the spec's library would trip: positional order, real signatures, refused
options (each with its message), float64, loss_weight 0, best-epoch restore with patience, the
mask's class set, cleared activation caches, the learner hierarchy, get_params and loggers."""

from __future__ import annotations

import copy
import functools
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import retain
from retain.learners.base import Learner
from retain.methods import (
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    JointModelUpdater,
    PooledOutputDistillationExperienceReplayModelUpdater,
    RepeatedDistillationModelUpdater,
    SuperExperienceReplayModelUpdater,
)
from retain.methods.er import DarkExperienceReplayLearner, ExperienceReplayLearner
from retain.models import MultiLayerPerceptron
from retain.updaters import loop

SGD = functools.partial(torch.optim.SGD, lr=0.1)
ER_FAMILY = [
    ExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    PooledOutputDistillationExperienceReplayModelUpdater,
    CLSExperienceReplayModelUpdater,
    SuperExperienceReplayModelUpdater,
]
ALL = [*ER_FAMILY, FineTuningModelUpdater, JointModelUpdater, RepeatedDistillationModelUpdater]
SPEC_SIGNATURES = {
    # the spec's positional order (copied from the spec's er.txt), after PREFIX: the method options
    ExperienceReplayModelUpdater: ["alpha"],
    DarkExperienceReplayModelUpdater: ["alpha", "beta"],
    PooledOutputDistillationExperienceReplayModelUpdater: ["alpha", "distillation_type", "normalize"],
    CLSExperienceReplayModelUpdater: [
        "alpha", "beta", "stable_model_update_weight", "plastic_model_update_weight",
        "stable_model_update_probability", "plastic_model_update_probability",
    ],
    SuperExperienceReplayModelUpdater: [
        "der_alpha", "der_beta", "sp_shrink_factor", "sp_sigma", "cls_alpha", "cls_stable_model_update_weight",
        "cls_plastic_model_update_weight", "cls_stable_model_update_probability",
        "cls_plastic_model_update_probability", "pod_alpha", "pod_distillation_type", "pod_normalize",
    ],
}  # fmt: skip
PREFIX = ["model", "loss_fn", "optimizer", "memory_size", "batch_memory_frac", "loss_weight",
          "ema_memory_update_gamma", "loss_normalization"]  # fmt: skip


def mlp(outputs: int = 4) -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(num_inputs=4, num_outputs=outputs, hidden_sizes=(8,))


def data(classes: tuple[int, ...] = (0, 1), n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 4, generator=g) + y[:, None].float()
    return TensorDataset(x, y)


def build(cls: type, **options: Any) -> Any:
    options.setdefault("accelerator", "cpu")
    options.setdefault("batch_size", 8)
    options.setdefault("max_epochs", 1)
    if cls not in (FineTuningModelUpdater, JointModelUpdater):
        options.setdefault("memory_size", 10)
    return cls(mlp(), optimizer=SGD, **options)


# ------------------------------------------------------------------------------------ signatures
@pytest.mark.parametrize("cls", ER_FAMILY, ids=lambda c: c.__name__)
def test_positional_prefix_is_the_specs_and_the_rest_is_keyword_only(cls: type) -> None:
    params = inspect.signature(cls).parameters
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == PREFIX + SPEC_SIGNATURES[cls]
    for name in ("memory_batch_size", "input_state_folder", "output_state_folder", "learning_rate_scheduler"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_positional_method_option_lands_on_the_method_option() -> None:
    updater = CLSExperienceReplayModelUpdater(mlp(), None, SGD, 10, 0.5, 1.0, 1.0, 1, 0.3, 0.2, 0.9, 0.8, 0.6, 0.5)
    c = updater.learner.built_components
    assert (c["memory_loss"].weight, c["cls_loss"].weight) == (0.3, 0.2)
    cls_loss = c["cls_loss"]
    assert (cls_loss.stable_model_update_weight, cls_loss.plastic_model_update_weight) == (0.9, 0.8)
    assert (cls_loss.stable_model_update_probability, cls_loss.plastic_model_update_probability) == (0.6, 0.5)


def test_a_call_written_for_another_positional_order_fails_loudly(tmp_path: Path) -> None:
    """The issue's call: positions 9-11 were memory_batch_size and the state folders."""
    with pytest.raises(TypeError, match=r"takes at most 9 positional arguments .* got 11: pass the others by name"):
        ExperienceReplayModelUpdater(mlp(), None, SGD, 10, 0.5, 1.0, 1.0, 1, 1, None, "epoch")
    assert not (tmp_path / "epoch").exists()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_signature_and_help_list_every_option_with_its_default(cls: type) -> None:
    params = inspect.signature(cls).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in ("batch_size", "max_epochs", "seed", "patience", "mask_class_set", "output_state_folder"):
        assert name in params, name
    doc = inspect.getdoc(cls.__init__) or ""
    assert "patience: epochs without improvement" in doc and "(default 3)" in doc
    assert "(undocumented)" not in doc, [line for line in doc.splitlines() if "(undocumented)" in line]


def test_unknown_option_names_the_closest_and_every_valid_one() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) memory_sise \(did you mean 'memory_size'\?\)"):
        ExperienceReplayModelUpdater(mlp(), optimizer=SGD, memory_sise=10)


# ------------------------------------------------------------------------------------ refusals
REFUSED = {
    "negative loss_weight": (ExperienceReplayModelUpdater, {"loss_weight": -1.0}, "loss_weight must be >= 0"),
    "negative alpha": (ExperienceReplayModelUpdater, {"alpha": -0.5}, "alpha must be >= 0"),
    "negative beta": (DarkExperienceReplayModelUpdater, {"beta": -1.0}, "beta must be >= 0"),
    "negative der_alpha": (SuperExperienceReplayModelUpdater, {"der_alpha": -1.0}, "der_alpha must be >= 0"),
    "negative pod_alpha": (SuperExperienceReplayModelUpdater, {"pod_alpha": -1.0}, "pod_alpha must be >= 0"),
    "negative cls beta": (CLSExperienceReplayModelUpdater, {"beta": -0.1}, "beta must be >= 0"),
    "zero shrink": (SuperExperienceReplayModelUpdater, {"sp_shrink_factor": 0.0}, "sp_shrink_factor must be > 0"),
    "negative shrink": (SuperExperienceReplayModelUpdater, {"sp_shrink_factor": -0.5}, "sp_shrink_factor must be > 0"),
    "single_device with 2 devices": (
        ExperienceReplayModelUpdater, {"strategy": "single_device", "devices": 2},
        "strategy='single_device' trains on one device, but devices=2",
    ),
    "RD on 2 devices": (RepeatedDistillationModelUpdater, {"devices": 2}, "runs on one process: devices=2"),
    "misspelled metric": (DarkExperienceReplayModelUpdater, {"metric": "val_acuracy"},
                          "metric='val_acuracy' is not computed; choose one of val_loss, val_accuracy"),
    "patience 0": (FineTuningModelUpdater, {"patience": 0}, "patience must be a positive integer"),
    "unknown mask class set": (ExperienceReplayModelUpdater, {"mask_class_set": "all"}, "mask_class_set='all'"),
    "logger without log_metrics": (FineTuningModelUpdater, {"logger": object()}, "logger must have a log_metrics"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED), ids=str)
def test_refused_options_fail_at_construction_with_a_message(case: str) -> None:
    cls, options, message = REFUSED[case]
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        build(cls, **options)


@pytest.mark.parametrize("cls", [DarkExperienceReplayModelUpdater, FineTuningModelUpdater,
                                 RepeatedDistillationModelUpdater], ids=lambda c: c.__name__)  # fmt: skip
@pytest.mark.parametrize("options", [{"early_stopping_enabled": True, "metric": "val_loss"}, {"metric": "val_loss"}])
def test_monitoring_without_val_data_is_refused_before_any_training(
    cls: type, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []
    real_fit = loop.fit

    def spy(learner: Learner, *args: Any, **kwargs: Any) -> Any:
        trained.append(type(learner).__name__)
        return real_fit(learner, *args, **kwargs)

    for module in ("retain.updaters.base", "retain.methods.repeated_distill"):
        monkeypatch.setattr(f"{module}.fit", spy)
    updater = build(cls, **options)
    with pytest.raises(ValueError, match="monitors validation metrics, but this update has no val_dataset"):
        updater.update(data())
    assert trained == []  # refused before the first epoch (for RD: before the expert trains)


def test_accepted_spec_values() -> None:
    assert build(ExperienceReplayModelUpdater, strategy=None).options.strategy == "auto"
    pod = build(PooledOutputDistillationExperienceReplayModelUpdater, distillation_type="pixel", max_epochs=2)
    pod.update(data())
    assert pod.learner.built_components["pod_loss"].distillation_type == "pixel"


def test_pixel_pod_compares_every_squared_activation() -> None:
    from retain.learners.components import pod_pool

    h = torch.randn(3, 2, 4, 5)
    assert torch.equal(pod_pool(h, "pixel"), h.pow(2).flatten(1))


# ------------------------------------------------------------------------------------ semantics
def test_precision_64_trains_in_float64(tmp_path: Path) -> None:
    seen: list[torch.dtype] = []

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        seen.append(logits.dtype)
        return nn.functional.cross_entropy(logits, targets, reduction="none")

    updater = CLSExperienceReplayModelUpdater(
        mlp(), loss_fn, SGD, 10, accelerator="cpu", batch_size=8, max_epochs=2, precision="64",
        output_state_folder=tmp_path / "v0",
    )  # fmt: skip
    served = updater.update(data())
    assert set(seen) == {torch.float64}
    assert all(p.dtype == torch.float64 for p in served.parameters())
    assert all(p.dtype == torch.float64 for p in updater.learner.model.parameters())
    again = CLSExperienceReplayModelUpdater(
        mlp(), loss_fn, SGD, 10, accelerator="cpu", batch_size=8, max_epochs=1, precision="64-true",
        input_state_folder=tmp_path / "v0", output_state_folder=tmp_path / "v1",
    )  # fmt: skip
    again.update(data((2, 3)))
    loaded = retain.load_model(tmp_path / "v1")
    assert next(loaded.parameters()).dtype == torch.float64
    assert loaded(torch.randn(2, 4)).dtype == torch.float64  # float32 inputs are cast


@pytest.mark.parametrize("cls", [ExperienceReplayModelUpdater, DarkExperienceReplayModelUpdater])
def test_loss_weight_zero_trains_without_nan(cls: type) -> None:
    updater = build(cls, loss_weight=0.0, max_epochs=2)
    updater.update(data())  # first update: empty memory, the only term has weight 0
    updater.update(data((2, 3)))  # second: the memory terms train
    assert all(bool(torch.isfinite(p).all()) for p in updater.learner.model.parameters())


def scripted_validation(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> list[dict[str, Tensor]]:
    """Replaces validation by a scripted val_loss sequence; returns the weights seen at each epoch's end."""
    weights: list[dict[str, Tensor]] = []

    def validate(learner: Learner) -> dict[str, float]:
        weights.append({k: v.clone() for k, v in learner.model.state_dict().items()})
        return {"val_loss": values[len(weights) - 1], "val_accuracy": 0.0}

    monkeypatch.setattr(loop, "validate", validate)
    return weights


@pytest.mark.parametrize(("patience", "epochs_run"), [(3, 5), (1, 3), (5, 7), (7, 8)])
def test_early_stopping_waits_patience_epochs_and_restores_the_best(
    patience: int, epochs_run: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = scripted_validation(monkeypatch, [5.0, 3.0, 4.0, 3.5, 3.0, 6.0, 7.0, 8.0])
    updater = build(DarkExperienceReplayModelUpdater, max_epochs=8, metric="val_loss", early_stopping_enabled=True,
                    patience=patience)  # fmt: skip
    model = updater.update(data(), data())
    assert updater.last_fit is not None and updater.last_fit.epochs == epochs_run
    assert updater.last_fit.stopped_early is (epochs_run < 8)
    best = weights[1]  # epoch 2 has the lowest val_loss (3.0; the later 3.0 does not improve on it)
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert not torch.equal(weights[-1]["layers.0.weight"], best["layers.0.weight"])


def test_metric_without_early_stopping_keeps_the_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = scripted_validation(monkeypatch, [2.0, 1.0, 3.0, 4.0])
    updater = build(FineTuningModelUpdater, max_epochs=4, metric="val_loss")
    model = updater.update(data(), data())
    assert updater.last_fit is not None and updater.last_fit.epochs == 4
    assert torch.equal(model.state_dict()["layers.0.weight"], weights[1]["layers.0.weight"])
    assert updater.learner.best_state is None  # not carried into the saved state


@pytest.mark.parametrize(("class_set", "expected"), [("current", [2, 3]), ("current_and_memory", [0, 1, 2, 3])])
def test_mask_class_set(class_set: str, expected: list[int]) -> None:
    updater = build(DarkExperienceReplayModelUpdater, mask_unused_classes=True, mask_class_set=class_set)
    updater.update(data((0, 1)))
    assert updater.learner.masked_classes == [0, 1]
    updater.update(data((2, 3)))
    assert updater.learner.masked_classes == expected
    stored = updater.learner.memory.raw_items()[2]["logits"]
    assert bool(torch.isfinite(stored).all())  # stored logits stay unmasked in both sets


@pytest.mark.parametrize("cls", [*ER_FAMILY, FineTuningModelUpdater, JointModelUpdater], ids=lambda c: c.__name__)
def test_returned_model_holds_no_step_activations_and_deep_copies(cls: type) -> None:
    updater = build(cls)
    updater.update(data())
    model = updater.update(data((2, 3)))
    for m in (model, updater.learner.model):
        assert m.get_intermediate_representation() == []
        copy.deepcopy(m)


def test_dark_experience_replay_learner_is_an_experience_replay_learner() -> None:
    assert issubclass(DarkExperienceReplayLearner, ExperienceReplayLearner)
    learner = build(DarkExperienceReplayModelUpdater, alpha=0.2, beta=0.7).learner
    assert isinstance(learner, ExperienceReplayLearner)
    c = learner.built_components
    assert list(c) == ["mse_loss", "memory_loss"] and (c["mse_loss"].weight, c["memory_loss"].weight) == (0.2, 0.7)


def test_get_params_of_a_task_are_the_shared_layers_and_its_head() -> None:
    model = mlp()
    model.add_task_params("a")
    model.add_task_params("b")
    params = model.get_params("a")
    ids = {id(p) for p in params}
    assert {id(p) for p in model.heads["a"].parameters()} <= ids
    assert not {id(p) for p in model.heads["b"].parameters()} & ids
    assert {id(p) for p in model.layers.parameters()} <= ids
    with pytest.raises(KeyError, match="no head for task id 'c'"):
        model.get_params("c")


class _SavingLogger:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.saved = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(metrics)

    def save(self) -> None:
        self.saved += 1


def test_a_logger_with_save_is_saved_after_training() -> None:
    logger = _SavingLogger()
    build(FineTuningModelUpdater, logger=logger, max_epochs=2).update(data(), data())
    assert logger.saved == 1 and any("val_loss" in m for m in logger.metrics)


def test_lightning_csv_logger_is_accepted(tmp_path: Path) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers", reason="lightning is not installed (optional)")
    logger = loggers.CSVLogger(str(tmp_path))
    build(FineTuningModelUpdater, logger=logger, max_epochs=2).update(data(), data())
    assert list(tmp_path.rglob("metrics.csv"))
