"""New data must be storable next to what the memory already holds; refused before any training step."""

import functools

import pytest
import torch
from torch.utils.data import TensorDataset

import retain


def test_new_inputs_of_another_dtype_are_refused_before_training(tmp_path):
    model = retain.MultiLayerPerceptron(4, 3, [5])
    updater = retain.ExperienceReplayModelUpdater(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=10, batch_size=4, max_epochs=1,
        train_transform=lambda x: x.float(),
    )
    updater.update(TensorDataset(torch.rand(8, 4), torch.randint(0, 3, (8,))))
    steps = updater.learner.global_step
    memory_before = updater.learner.memory.inputs.clone()
    with pytest.raises(ValueError, match=r"cannot join the memory.*float32"):
        updater.update(TensorDataset(torch.randint(0, 3, (8, 4)), torch.randint(0, 3, (8,))))
    assert updater.learner.global_step == steps
    assert torch.equal(updater.learner.memory.inputs, memory_before)
