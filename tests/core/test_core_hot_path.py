"""The training hot path: memory on the model's device, no DataLoader per step."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from retain import ExperienceReplayModelUpdater, MultiLayerPerceptron

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_EPOCHS = 3


@pytest.fixture
def dataloader_count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    count = {"n": 0}
    real_init = DataLoader.__init__

    def counting_init(self, *args, **kwargs):
        count["n"] += 1
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DataLoader, "__init__", counting_init)
    return count


def _er_update(dataset: Dataset, device: str) -> ExperienceReplayModelUpdater:
    torch.manual_seed(0)
    updater = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(64, 10, [32]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        memory_size=50,
        batch_size=20,
        max_epochs=MAX_EPOCHS,
        accelerator="cuda" if device == "cuda" else "cpu",
    )
    updater.update(dataset)
    return updater


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrap", ["tensor", "subset"])
def test_tensor_datasets_use_no_dataloader(digits_tasks, dataloader_count, device: str, wrap: str) -> None:
    train = digits_tasks[0][0]
    dataset = train if wrap == "tensor" else Subset(train, list(range(0, len(train), 2)))
    updater = _er_update(dataset, device)
    assert dataloader_count["n"] == 0
    memory = updater.learner.memory
    model_device = next(updater.model.parameters()).device
    assert model_device.type == device
    assert memory.inputs is not None and memory.targets is not None
    assert memory.inputs.device == model_device and memory.targets.device == model_device
    assert updater.learner.global_step == MAX_EPOCHS * -(-len(dataset) // 10)  # 10 new items per step
    assert memory.seen == MAX_EPOCHS * len(dataset)


@pytest.mark.parametrize("device", DEVICES)
def test_other_datasets_use_one_dataloader_per_update(digits_tasks, dataloader_count, map_dataset, device: str) -> None:
    train = digits_tasks[0][0]
    updater = _er_update(map_dataset(*train.tensors), device)
    assert dataloader_count["n"] == 1  # built once, iterated once per epoch (persistent workers survive epochs)
    memory = updater.learner.memory
    assert memory.inputs is not None and memory.inputs.device == next(updater.model.parameters()).device
    assert memory.seen == MAX_EPOCHS * len(train)


def test_memory_sampling_builds_no_dataloader(dataloader_count) -> None:
    from retain.memory import ReservoirMemory

    memory = ReservoirMemory(100, seed=0)
    memory.add(torch.rand(300, 4), torch.zeros(300, dtype=torch.long))
    for _ in range(20):
        memory.sample(32)
    assert dataloader_count["n"] == 0
