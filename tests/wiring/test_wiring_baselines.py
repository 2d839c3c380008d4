"""The baselines do what their docstrings say, observed through real updates.

Fine-tuning keeps training the weights it was given (continued from the input state) on the new
chunk alone; joint training re-initialises the model at every update and trains on every item
seen so far. Forward hooks record which inputs the model is trained on (train-mode forwards only:
the data checks probe the model in eval mode).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

import retain
from retain import MultiLayerPerceptron
from retain.methods import FineTuningModelUpdater, JointModelUpdater

ITEMS = 12


def chunk(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(ITEMS, 4, generator=g), torch.randint(0, 3, (ITEMS,), generator=g))


def mlp() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))


def build(cls: type, lr: float, input_state: Path | None, output_state: Path, **options) -> retain.ModelUpdater:
    options = {"batch_size": 4, "max_epochs": 1, "accelerator": "cpu", **options}
    return cls(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=lr), input_state_folder=input_state,
               output_state_folder=output_state, **options)


def trained_inputs(model: torch.nn.Module) -> list[Tensor]:
    """Collects the inputs of every train-mode forward of ``model``."""
    seen: list[Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        if module.training:
            seen.append(args[0].detach().clone())

    model.register_forward_hook(hook)
    return seen


def rows(tensors: list[Tensor]) -> list[tuple[float, ...]]:
    return sorted(tuple(r.tolist()) for r in torch.cat(tensors))


def weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [FineTuningModelUpdater, JointModelUpdater], ids=["finetune", "joint"])
def test_what_each_baseline_trains_on(cls: type, tmp_path: Path) -> None:
    """Fine-tuning's second update sees the second chunk only; joint's sees both chunks, each once per epoch."""
    build(cls, 0.1, None, tmp_path / "v0").update(chunk(0))
    updater = build(cls, 0.1, tmp_path / "v0", tmp_path / "v1")
    seen = trained_inputs(updater.learner.model)
    updater.update(chunk(1))
    expected = [chunk(1).tensors[0]] if cls is FineTuningModelUpdater else [chunk(0).tensors[0], chunk(1).tensors[0]]
    assert rows(seen) == rows(expected)


def test_fine_tuning_continues_from_the_weights_it_was_given(tmp_path: Path) -> None:
    """With lr=0 a fine-tuning update changes no weight: the model is neither re-initialised at the
    first update nor at a later one (the input state's weights are continued)."""
    model = mlp()
    initial = weights(model)
    first = FineTuningModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=0.0), batch_size=4,
                                   max_epochs=1, accelerator="cpu", output_state_folder=tmp_path / "v0")
    assert same(weights(first.update(chunk(0))), initial)
    build(FineTuningModelUpdater, 0.1, tmp_path / "v0", tmp_path / "v1").update(chunk(1))
    trained = weights(retain.load_model(tmp_path / "v1"))
    assert not same(trained, initial)
    third = build(FineTuningModelUpdater, 0.0, tmp_path / "v1", tmp_path / "v2")
    assert same(weights(third.update(chunk(2))), trained)
    assert same(weights(retain.load_model(tmp_path / "v2")), trained)


def test_joint_reinitialises_the_model_at_every_update(tmp_path: Path) -> None:
    """With lr=0 a joint update's weights are fresh ones: not the weights given, not the previous
    state's, and the same fresh draw in a repeated run (seeded)."""
    model = mlp()
    initial = weights(model)
    first = build(JointModelUpdater, 0.1, None, tmp_path / "v0").update(chunk(0))
    after_first = weights(first)
    assert not same(after_first, initial)
    second = weights(build(JointModelUpdater, 0.0, tmp_path / "v0", tmp_path / "v1").update(chunk(1)))
    again = weights(build(JointModelUpdater, 0.0, tmp_path / "v0", tmp_path / "v1b").update(chunk(1)))
    assert not same(second, after_first) and not same(second, initial)
    assert same(second, again)
    # the fresh weights are what the model's own initialisation draws, not a scaled or zeroed copy
    stds = [float(v.std()) for k, v in second.items() if k.endswith("weight")]
    assert all(s > 0.05 for s in stds)


def test_joint_state_keeps_every_item_seen(tmp_path: Path) -> None:
    """The joint state holds all items seen (inputs and targets) and the next update trains on them."""
    build(JointModelUpdater, 0.1, None, tmp_path / "v0").update(chunk(0))
    build(JointModelUpdater, 0.1, tmp_path / "v0", tmp_path / "v1").update(chunk(1))
    updater = build(JointModelUpdater, 0.1, tmp_path / "v1", tmp_path / "v2")
    seen = trained_inputs(updater.learner.model)
    targets: list[Tensor] = []
    real_loss = updater.learner.loss_fn

    def loss_fn(outputs: Tensor, y: Tensor) -> Tensor:
        targets.append(y.detach().clone())
        return real_loss(outputs, y)

    updater.learner.loss_fn = loss_fn
    updater.update(chunk(2))
    all_chunks = [chunk(s) for s in range(3)]
    assert rows(seen) == rows([c.tensors[0] for c in all_chunks])
    assert sorted(torch.cat(targets).tolist()) == sorted(torch.cat([c.tensors[1] for c in all_chunks]).tolist())


@pytest.mark.parametrize("cls", [FineTuningModelUpdater, JointModelUpdater], ids=["finetune", "joint"])
def test_each_baseline_validates_on_the_val_dataset(cls: type, tmp_path: Path) -> None:
    """The val dataset given to update() is scored after every epoch (accuracy of the final model)."""
    val = chunk(7)
    updater = build(cls, 0.1, None, tmp_path / "v0", max_epochs=2)
    model = updater.update(chunk(0), val)
    assert updater.last_fit is not None and len(updater.last_fit.history) == 2
    with torch.no_grad():
        hits = float((model(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean())
    assert updater.last_fit.history[-1]["val_accuracy"] == pytest.approx(hits)


@pytest.mark.parametrize("offset", [0, 5], ids=["view at offset 0", "view at offset 5"])
def test_joint_keeps_its_own_copy_of_the_items_not_views_of_the_callers_tensors(
    offset: int, tmp_path: Path
) -> None:
    """Joint's kept chunk is a copy owning exactly its bytes: the caller changing (or freeing) the larger
    tensors the dataset's items are slices of changes nothing Joint holds or trains on later."""
    g = torch.Generator().manual_seed(3)
    all_inputs, all_targets = torch.randn(100, 4, generator=g), torch.randint(0, 3, (100,), generator=g)
    inputs, targets = all_inputs[offset : offset + ITEMS], all_targets[offset : offset + ITEMS]
    expected = (inputs.clone(), targets.clone())
    updater = build(JointModelUpdater, 0.1, None, tmp_path / "s1")
    updater.update(TensorDataset(inputs, targets))
    all_inputs.zero_(), all_targets.zero_()
    (kept_inputs, kept_targets), = updater.learner.chunks
    assert torch.equal(kept_inputs, expected[0]) and torch.equal(kept_targets, expected[1])
    for kept in (kept_inputs, kept_targets):
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
