"""CLS-ER: the copies update with the documented probabilities, the stable copy is served and saved,
and the working model and both copies come back from a state folder."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from retain.learners.components import WeightedCLSLossComponent
from retain.methods.er import CLSExperienceReplayModelUpdater
from retain.models import MultiLayerPerceptron
from retain.state import StateFolder
from retain.updaters import load_model

SGD = functools.partial(torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize(("plastic", "stable"), [(0.9, 0.7), (1.0, 1.0), (0.5, 0.5), (0.3, 0.0)])
def test_copies_update_with_their_probabilities(plastic: float, stable: float) -> None:
    """Each step draws two uniforms from the component's generator (seeded with ``seed``): the
    plastic copy updates when the first is below its probability, the stable copy when the second
    is below its own. The seeded draws give the exact set of steps at which each copy changes."""
    torch.manual_seed(0)
    working = MultiLayerPerceptron(num_inputs=2, num_outputs=2, hidden_sizes=())
    component = WeightedCLSLossComponent(
        0.1,
        False,
        model=working,
        plastic_model_update_probability=plastic,
        stable_model_update_probability=stable,
        seed=7,
    )
    weight = working.heads["default_task"].weight
    plastic_weight = component.plastic_model.heads["default_task"].weight
    stable_weight = component.stable_model.heads["default_task"].weight
    steps = 500
    changed = torch.zeros(steps, 2, dtype=torch.bool)
    for step in range(steps):
        with torch.no_grad():
            weight.add_(1.0)  # the working model keeps moving away, so every EMA update shows
        before_p, before_s = plastic_weight.clone(), stable_weight.clone()
        component.on_train_batch_end(working)
        changed[step, 0] = not torch.equal(plastic_weight, before_p)
        changed[step, 1] = not torch.equal(stable_weight, before_s)
    draws = torch.rand(steps, 2, generator=torch.Generator().manual_seed(7))  # the same stream, two per step
    expected = torch.stack([draws[:, 0] < plastic, draws[:, 1] < stable], dim=1)
    assert torch.equal(changed, expected)
    rates = changed.float().mean(0).tolist()
    assert rates[0] == pytest.approx(plastic, abs=0.06) and rates[1] == pytest.approx(stable, abs=0.06)


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g))


def cls_updater(model: MultiLayerPerceptron, **kwargs: object) -> CLSExperienceReplayModelUpdater:
    return CLSExperienceReplayModelUpdater(
        model, optimizer=SGD, memory_size=50, batch_size=8, max_epochs=1, accelerator="cpu", seed=0,
        stable_model_update_probability=0.5, plastic_model_update_probability=0.5, **kwargs,
    )  # fmt: skip


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_update_serves_the_stable_copy_and_state_restores_all_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))
    updater = cls_updater(model, output_state_folder=tmp_path / "s1")
    served = updater.update(make_data(40, seed=1))
    component = updater.learner.built_components["cls_loss"]
    assert served is component.stable_model
    assert not states_equal(served, updater.learner.model)  # the stable copy is not the working model
    assert states_equal(load_model(tmp_path / "s1"), component.stable_model)

    torch.manual_seed(123)  # a differently initialised model of the same architecture
    restored = cls_updater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)), input_state_folder=tmp_path / "s1"
    )
    restored_component = restored.learner.built_components["cls_loss"]
    assert states_equal(restored.learner.model, updater.learner.model)  # working model from learner.safetensors
    assert states_equal(restored_component.stable_model, component.stable_model)
    assert states_equal(restored_component.plastic_model, component.plastic_model)
    assert restored_component.step == component.step == 10  # 40 items, 4 new per step
    assert restored_component.generator.get_state().equal(component.generator.get_state())

    # both continue identically from the same state
    restored.output_state_folder = tmp_path / "s2"
    updater.output_state_folder = tmp_path / "s3"
    served_a = updater.update(make_data(24, seed=2))
    served_b = restored.update(make_data(24, seed=2))
    assert states_equal(served_a, served_b)


@pytest.mark.parametrize(("plastic", "stable"), [(1.0, 1.0), (0.5, 0.5), (0.7, 0.9)])
def test_equal_or_reversed_probabilities_are_valid(plastic: float, stable: float) -> None:
    updater = CLSExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)), optimizer=SGD, memory_size=10,
        accelerator="cpu", plastic_model_update_probability=plastic, stable_model_update_probability=stable,
    )  # fmt: skip
    component = updater.learner.built_components["cls_loss"]
    assert (component.plastic_model_update_probability, component.stable_model_update_probability) == (plastic, stable)


def test_the_copies_are_frozen_and_the_served_copy_holds_no_gradient() -> None:
    """Only the working model trains: the stable copy CLS-ER serves (and the plastic one) follow it by
    EMA alone, so neither requires gradients nor collects any during an update."""
    torch.manual_seed(0)
    updater = cls_updater(MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)))
    served = updater.update(make_data(40, seed=1))
    component = updater.learner.built_components["cls_loss"]
    assert served is component.stable_model
    for copy_model in (component.stable_model, component.plastic_model):
        assert [p.requires_grad for p in copy_model.parameters()] == [False] * len(list(copy_model.parameters()))
        assert all(p.grad is None for p in copy_model.parameters())
    assert all(p.requires_grad for p in updater.learner.model.parameters()), "the working model trains"


def test_a_plain_module_served_by_cls_er_records_every_task_id_in_its_state(tmp_path: Path) -> None:
    """The served stable copy of a plain ``nn.Module`` (one shared output layer) records each update's
    task id, so the state folder's model description lists the task ids trained so far."""
    def updater(**folders: Path) -> CLSExperienceReplayModelUpdater:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        return cls_updater(module, **folders)

    updater(output_state_folder=tmp_path / "s1").update(make_data(16, seed=1), task_id="t1")
    updater(input_state_folder=tmp_path / "s1", output_state_folder=tmp_path / "s2").update(
        make_data(16, seed=2), task_id="t2"
    )
    for folder, task_ids in (("s1", ["t1"]), ("s2", ["t1", "t2"])):
        model = json.loads((tmp_path / folder / "manifest.json").read_text())["model"]
        assert (model["class"], model["task_ids"]) == ("Sequential", task_ids)


def test_load_state_into_an_updater_gives_its_copies_the_task_heads_of_the_state(tmp_path: Path) -> None:
    """``load_state`` (how the parent of a multi-process update takes the ranks' result back) into an
    updater whose copies were built before a task's head existed: the copies get the state's heads
    and weights, as a new updater on that folder would hold them."""
    torch.manual_seed(0)
    trained = cls_updater(MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
                          output_state_folder=tmp_path / "s1")  # fmt: skip
    trained.update(make_data(24, seed=1), task_id="t1")
    torch.manual_seed(0)
    loader = cls_updater(MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)))
    loader.load_state(StateFolder(tmp_path / "s1"))
    mine, theirs = loader.learner.built_components["cls_loss"], trained.learner.built_components["cls_loss"]
    for name in ("stable_model", "plastic_model"):
        assert getattr(mine, name).task_ids == ["default_task", "t1"]
        assert states_equal(getattr(mine, name), getattr(theirs, name)), name
