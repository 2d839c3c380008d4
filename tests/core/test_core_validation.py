"""Refusals before training: bad options, bad method options, bad data; a diverging loss stops the
update without writing a state folder."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    JointModelUpdater,
    ModelUpdater,
    MultiLayerPerceptron,
    NonFiniteLossError,
    TrainingOptions,
)

SGD = functools.partial(torch.optim.SGD, lr=0.05)
UPDATERS = {
    "FineTuning": (FineTuningModelUpdater, {}),
    "Joint": (JointModelUpdater, {}),
    "ER": (ExperienceReplayModelUpdater, {"memory_size": 20}),
}


def _model() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(64, 10, [16])


def _updater(cls: type[ModelUpdater], method_kwargs: dict, **kwargs: Any) -> ModelUpdater:
    options = {"batch_size": 16, "max_epochs": 1, "accelerator": "cpu", "optimizer": SGD, **kwargs}
    return cls(_model(), **method_kwargs, **options)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"max_epochs": -1}, "max_epochs"),
        ({"precision": "fp8"}, "precision"),
        ({"strategy": "foo"}, "strategy"),
        ({"mode": "avg"}, "mode"),
        ({"accelerator": "tpu"}, "accelerator"),
        ({"gradient_clip_val": 0.0}, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "max"}, "gradient_clip_algorithm"),
        ({"learning_rate_scheduler_interval": "batch"}, "learning_rate_scheduler_interval"),
        ({"early_stopping_enabled": True}, "metric"),
    ],
)
def test_bad_option_values_name_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TrainingOptions(**kwargs)
    with pytest.raises(ValueError, match=name):
        FineTuningModelUpdater(_model(), optimizer=SGD, **kwargs)


def test_precision_given_as_a_number_is_accepted() -> None:
    assert TrainingOptions(precision=32).precision == "32"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls", [FineTuningModelUpdater, JointModelUpdater, ExperienceReplayModelUpdater, DarkExperienceReplayModelUpdater]
)
def test_unknown_option_is_a_type_error_naming_it(cls: type[ModelUpdater]) -> None:
    with pytest.raises(TypeError, match=r"batch_sise.*batch_size"):
        cls(_model(), optimizer=SGD, batch_sise=8)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (ExperienceReplayModelUpdater, {"memory_size": -1}, "memory_size"),
        (ExperienceReplayModelUpdater, {"memory_size": 10, "batch_memory_frac": 1.0}, "batch_memory_frac"),
        (ExperienceReplayModelUpdater, {"memory_size": 10, "batch_memory_frac": -0.1}, "batch_memory_frac"),
        (DarkExperienceReplayModelUpdater, {"memory_size": 10, "memory_batch_size": -2}, "memory_batch_size"),
        (
            DarkExperienceReplayModelUpdater,
            {"memory_size": 10, "ema_memory_update_gamma": 0.0},
            "ema_memory_update_gamma",
        ),
    ],
)
def test_bad_method_options_fail_at_construction(cls: type[ModelUpdater], kwargs: dict, name: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=name):
        cls(_model(), optimizer=SGD, output_state_folder=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        FineTuningModelUpdater(_model())


# ------------------------------------------------------------------------------------------ data
def _data(n: int = 40, shape: tuple[int, ...] = (1, 8, 8), labels: Tensor | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *shape), generator=g)
    y = labels if labels is not None else torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _nan_inputs() -> TensorDataset:
    data = _data()
    data.tensors[0][3, 0, 2, 2] = float("nan")
    return data


BAD_DATA = {
    "empty": (lambda D: TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), "empty"),
    "label too large": (lambda D: _data(labels=torch.arange(40) % 11), r"labels must lie in \[0, 9\].*10"),
    "negative label": (lambda D: _data(labels=torch.arange(40) % 10 - 1), r"labels must lie in \[0, 9\].*-1"),
    "float labels": (lambda D: _data(labels=torch.zeros(40)), "integer"),
    "wrong input shape": (lambda D: _data(shape=(1, 7, 7)), r"shape \(1, 7, 7\).*do not fit"),
    "nan inputs": (lambda D: _nan_inputs(), "NaN"),
    "non-tensor empty": (lambda D: D(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), "empty"),
    "non-tensor wrong shape": (lambda D: D(torch.rand(10, 5), torch.zeros(10, dtype=torch.long)), "fit"),
}


@pytest.mark.parametrize("method", list(UPDATERS))
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_training(method: str, case: str, tmp_path: Path, map_dataset: type) -> None:
    cls, method_kwargs = UPDATERS[method]
    make, message = BAD_DATA[case]
    updater = _updater(cls, method_kwargs, output_state_folder=tmp_path / "out")
    weights = {k: v.clone() for k, v in updater.model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        updater.update(make(map_dataset))
    assert updater.learner.global_step == 0
    assert all(torch.equal(v, updater.model.state_dict()[k]) for k, v in weights.items())
    assert not (tmp_path / "out").exists()


def test_bad_validation_data_is_refused_before_training(tmp_path: Path) -> None:
    updater = _updater(FineTuningModelUpdater, {}, output_state_folder=tmp_path / "out")
    with pytest.raises(ValueError, match=r"val_dataset.*labels"):
        updater.update(_data(), val_dataset=_data(labels=torch.full((40,), 12)))
    assert updater.learner.global_step == 0 and not (tmp_path / "out").exists()


def test_update_classes_must_be_classes_of_the_model() -> None:
    """The model's classes are 0 .. num_outputs - 1: the last one may be declared, one past it may not."""
    kwargs = {"memory_size": 20, "mask_unused_classes": True}
    with pytest.raises(ValueError, match=r"update_classes \[0, 10\] exceed the model's 10 classes"):
        _updater(ExperienceReplayModelUpdater, kwargs, update_classes=[0, 10]).update(_data())
    updater = _updater(ExperienceReplayModelUpdater, kwargs, update_classes=[0, 9])
    updater.update(_data(labels=torch.arange(40) % 2 * 9))
    assert updater.learner._class_mask.nonzero().flatten().tolist() == [0, 9]


@pytest.mark.parametrize("method", list(UPDATERS))
def test_refused_update_leaves_the_updater_usable(method: str, tmp_path: Path) -> None:
    """A refused update must not leave traces (Joint's kept data, task ids) in the updater."""
    cls, method_kwargs = UPDATERS[method]
    updater = _updater(cls, method_kwargs, output_state_folder=tmp_path / "out")
    with pytest.raises(ValueError, match=r"train_dataset: item \d+: inputs contain NaN or Inf"):
        updater.update(_nan_inputs(), task_id="bad")
    good = _data()
    updater.update(good)
    assert updater.learner.task_ids_seen == ["default_task"]
    seen = getattr(updater.learner, "seen_inputs", None)
    if seen is not None:
        assert torch.equal(seen, good.tensors[0])


# ------------------------------------------------------------------------------------------ divergence
def _nan_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return outputs.sum(dim=1) * float("nan")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"optimizer": functools.partial(torch.optim.SGD, lr=1e30)},
        {"loss_fn": _nan_loss},
        {"loss_fn": _nan_loss, "log_every_n_steps": 10_000},  # caught at the end of the epoch
    ],
    ids=["huge-lr", "nan-loss", "nan-loss-rare-logging"],
)
@pytest.mark.parametrize("method", ["FineTuning", "ER"])
def test_non_finite_loss_stops_the_update_without_writing_state(method: str, kwargs: dict, tmp_path: Path) -> None:
    cls, method_kwargs = UPDATERS[method]
    kwargs = {"log_every_n_steps": 1, **kwargs}
    updater = _updater(cls, method_kwargs, output_state_folder=tmp_path / "out", max_epochs=3, **kwargs)
    with pytest.raises(NonFiniteLossError, match="step"):
        updater.update(_data(n=200))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_nan_loss_names_the_first_bad_step(tmp_path: Path) -> None:
    updater = _updater(FineTuningModelUpdater, {}, loss_fn=_nan_loss, log_every_n_steps=5)
    with pytest.raises(NonFiniteLossError, match="at step 0 "):
        updater.update(_data(n=200))
