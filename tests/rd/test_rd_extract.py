"""extract_logits: order, shape, no gradients, mode restored, any dataset, the memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from retain.memory import ReservoirMemory
from retain.methods.repeated_distill import extract_logits
from retain.models import MultiLayerPerceptron


def _model() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(6, 4, [8])


def _data(n: int = 23) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_rd_extract_logits_keeps_order_shape_and_has_no_gradients() -> None:
    model, data = _model(), _data()
    logits = extract_logits(model, data, batch_size=5)
    assert logits.shape == (23, 4)
    assert not logits.requires_grad
    with torch.no_grad():
        expected = model(data.tensors[0])
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("start_training", [True, False])
def test_rd_extract_logits_runs_in_eval_mode_and_restores_the_mode(start_training: bool) -> None:
    model, data = _model(), _data()
    model.train(start_training)
    modes: list[bool] = []
    handle = model.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    extract_logits(model, data, batch_size=10)
    handle.remove()
    assert modes == [False, False, False]  # 23 items in batches of 10
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())


def test_rd_extract_logits_reads_map_style_datasets_and_subsets_in_order(map_dataset: type) -> None:
    model, data = _model(), _data()
    inputs, targets = data.tensors
    with torch.no_grad():
        expected = model(inputs)
    torch.testing.assert_close(extract_logits(model, map_dataset(inputs, targets), batch_size=4), expected)
    order = [7, 2, 19, 0, 11]
    torch.testing.assert_close(extract_logits(model, Subset(data, order), batch_size=2), expected[order])


def test_rd_extract_logits_applies_the_transform_and_the_task_head() -> None:
    model, data = _model(), _data()
    model.add_task_params("b")
    inputs = data.tensors[0]
    with torch.no_grad():
        expected = model(inputs * 2.0, "b")
    logits = extract_logits(model, data, batch_size=8, task_id="b", transform=lambda x: x * 2.0)
    torch.testing.assert_close(logits, expected)


def test_rd_extract_logits_on_the_memory_gives_its_filled_slots_in_slot_order_transformed() -> None:
    model, data = _model(), _data(30)
    memory = ReservoirMemory(9, seed=3, transform=lambda x: x - 1.0)
    inputs, targets = data.tensors
    memory.add(inputs[:20], targets[:20])
    memory.add(inputs[20:], targets[20:])
    stored = memory.raw_items()[0]
    with torch.no_grad():
        expected = model(stored - 1.0)
        untransformed = model(stored)
    logits = extract_logits(model, memory, batch_size=4)
    assert logits.shape == (9, 4)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, untransformed)


def test_rd_extract_logits_on_an_empty_memory_is_empty() -> None:
    assert extract_logits(_model(), ReservoirMemory(5), batch_size=4).shape == (0, 4)
