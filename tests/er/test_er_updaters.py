"""The ER-family updaters take the spec's (er.txt) keyword arguments with the spec's defaults, and
reject unknown ones with a TypeError that names the valid options."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import pytest
import torch

from retain.methods.er import (
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    PooledOutputDistillationExperienceReplayModelUpdater,
    SuperExperienceReplayModelUpdater,
)
from retain.models import MultiLayerPerceptron
from retain.options import TrainingOptions

SGD = functools.partial(torch.optim.SGD, lr=0.1)

# The spec's defaults, copied from er.txt. ``logger`` is left out: the spec's default is a
# TensorBoardLogger object, retain's is None (tensorboard is not a dependency).
COMMON = {
    "batch_memory_frac": 0.5,
    "loss_weight": 1.0,
    "ema_memory_update_gamma": 1.0,
    "loss_normalization": 1,
    "learning_rate_scheduler": None,
    "learning_rate_scheduler_interval": "epoch",
    "batch_size": 32,
    "input_state_folder": None,
    "output_state_folder": None,
    "max_epochs": 50,
    "train_transform": None,
    "train_target_transform": None,
    "test_transform": None,
    "test_target_transform": None,
    "buffer_transform": None,
    "buffer_target_transform": None,
    "metric": None,
    "mode": "min",
    "logged_metrics": None,
    "early_stopping_enabled": False,
    "accelerator": "auto",
    "devices": None,
    "strategy": "ddp",
    "precision": "32",
    "seed": 0,
    "deterministic_trainer": False,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
    "mask_unused_classes": False,
}
METHOD = {
    ExperienceReplayModelUpdater: {"alpha": 1.0},
    DarkExperienceReplayModelUpdater: {"alpha": 1.0, "beta": 1.0},
    PooledOutputDistillationExperienceReplayModelUpdater: {
        "alpha": 1.0,
        "distillation_type": "spatial",
        "normalize": 1,
    },
    CLSExperienceReplayModelUpdater: {
        "alpha": 0.5,
        "beta": 0.1,
        "stable_model_update_weight": 0.999,
        "plastic_model_update_weight": 0.999,
        "stable_model_update_probability": 0.7,
        "plastic_model_update_probability": 0.9,
    },
    SuperExperienceReplayModelUpdater: {
        "der_alpha": 1.0,
        "der_beta": 1.0,
        "sp_shrink_factor": 0.95,
        "sp_sigma": 0.001,
        "cls_alpha": 0.1,
        "cls_stable_model_update_weight": 0.999,
        "cls_plastic_model_update_weight": 0.999,
        "cls_stable_model_update_probability": 0.7,
        "cls_plastic_model_update_probability": 0.9,
        "pod_alpha": 1.0,
        "pod_distillation_type": "spatial",
        "pod_normalize": 1,
    },
}
UPDATERS = list(METHOD)


def model() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))


def effective_defaults(updater_class: type) -> dict[str, Any]:
    """Defaults as the code declares them: updater signature, learner signature, TrainingOptions."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingOptions) if f.default is not dataclasses.MISSING}
    for function in (updater_class.learner_class.__init__, updater_class.__init__):
        for name, p in inspect.signature(function).parameters.items():
            if p.default is not inspect.Parameter.empty:
                defaults[name] = p.default
    return defaults


@pytest.mark.parametrize("updater_class", UPDATERS, ids=lambda c: c.__name__)
def test_declared_defaults_match_the_spec(updater_class: type) -> None:
    defaults = effective_defaults(updater_class)
    for name, value in {**COMMON, **METHOD[updater_class]}.items():
        assert name in defaults, name
        assert defaults[name] == value and type(defaults[name]) is type(value), (name, defaults[name], value)


@pytest.mark.parametrize("updater_class", UPDATERS, ids=lambda c: c.__name__)
def test_accepts_every_spec_keyword(updater_class: type) -> None:
    kwargs = {**COMMON, **METHOD[updater_class], "logger": None}
    updater = updater_class(model=model(), loss_fn=None, optimizer=SGD, memory_size=10, **kwargs)
    learner = updater.learner
    assert learner.options.batch_size == 32 and learner.options.max_epochs == 50 and learner.options.seed == 0
    assert learner.memory.memory_size == 10


def components_of(updater: Any) -> dict[str, Any]:
    return updater.learner.built_components


def built_with_defaults(updater_class: type) -> Any:
    return updater_class(model(), optimizer=SGD, memory_size=10, accelerator="cpu")


@pytest.mark.parametrize("updater_class", UPDATERS, ids=lambda c: c.__name__)
def test_defaults_reach_the_learner(updater_class: type) -> None:
    learner = built_with_defaults(updater_class).learner
    assert (learner.loss_weight, learner.ema_memory_update_gamma, learner.loss_normalization) == (1.0, 1.0, 1)
    assert (learner.train_batch_size, learner.memory_batch_size) == (16, 16)  # 32 split by 0.5
    o = learner.options
    assert (o.max_epochs, o.seed, o.mask_unused_classes, o.precision, o.mode) == (50, 0, False, "32", "min")


def test_method_defaults_reach_the_components() -> None:
    c = components_of(built_with_defaults(ExperienceReplayModelUpdater))
    assert c["memory_loss"].weight == 1.0

    c = components_of(built_with_defaults(DarkExperienceReplayModelUpdater))
    assert (c["mse_loss"].weight, c["memory_loss"].weight) == (1.0, 1.0)

    c = components_of(built_with_defaults(PooledOutputDistillationExperienceReplayModelUpdater))
    assert (c["pod_loss"].weight, c["pod_loss"].distillation_type, c["pod_loss"].normalize) == (1.0, "spatial", True)

    c = components_of(built_with_defaults(CLSExperienceReplayModelUpdater))
    cls = c["cls_loss"]
    assert (c["memory_loss"].weight, cls.weight) == (0.5, 0.1)
    assert (cls.stable_model_update_weight, cls.plastic_model_update_weight) == (0.999, 0.999)
    assert (cls.stable_model_update_probability, cls.plastic_model_update_probability) == (0.7, 0.9)

    c = components_of(built_with_defaults(SuperExperienceReplayModelUpdater))
    cls, sp, pod = c["cls_loss"], c["shrink_perturb"], c["pod_loss"]
    assert (c["mse_loss"].weight, c["memory_loss"].weight, cls.weight, pod.weight) == (1.0, 1.0, 0.1, 1.0)
    assert (sp.shrink_factor, sp.sigma) == (0.95, 0.001)
    assert (cls.stable_model_update_weight, cls.plastic_model_update_weight) == (0.999, 0.999)
    assert (cls.stable_model_update_probability, cls.plastic_model_update_probability) == (0.7, 0.9)
    assert (pod.distillation_type, pod.normalize) == ("spatial", True)


def test_method_options_reach_the_components() -> None:
    updater = SuperExperienceReplayModelUpdater(
        model(), optimizer=SGD, memory_size=10, accelerator="cpu", der_alpha=0.2, der_beta=0.3, cls_alpha=0.4,
        pod_alpha=0.6, sp_shrink_factor=0.5, sp_sigma=0.02, pod_distillation_type="width", pod_normalize=0,
        cls_stable_model_update_probability=0.1, cls_plastic_model_update_probability=0.2,
        cls_stable_model_update_weight=0.3, cls_plastic_model_update_weight=0.4, ema_memory_update_gamma=0.8,
    )  # fmt: skip
    c = components_of(updater)
    cls, sp, pod = c["cls_loss"], c["shrink_perturb"], c["pod_loss"]
    assert (c["mse_loss"].weight, c["memory_loss"].weight, cls.weight, pod.weight) == (0.2, 0.3, 0.4, 0.6)
    assert (sp.shrink_factor, sp.sigma, pod.distillation_type, pod.normalize) == (0.5, 0.02, "width", False)
    assert (cls.stable_model_update_probability, cls.plastic_model_update_probability) == (0.1, 0.2)
    assert (cls.stable_model_update_weight, cls.plastic_model_update_weight) == (0.3, 0.4)
    assert updater.learner.ema_memory_update_gamma == 0.8


@pytest.mark.parametrize("updater_class", UPDATERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("typo", ["alpah", "batch_sise"])
def test_unknown_keyword_raises_type_error_naming_the_options(updater_class: type, typo: str) -> None:
    with pytest.raises(TypeError, match=rf"got unknown option\(s\) {typo}") as info:
        updater_class(model(), optimizer=SGD, memory_size=10, accelerator="cpu", **{typo: 1})
    message = str(info.value)
    assert typo in message and updater_class.__name__ in message
    for option in [*METHOD[updater_class], "batch_size", "max_epochs", "mask_unused_classes"]:
        assert option in message, option
