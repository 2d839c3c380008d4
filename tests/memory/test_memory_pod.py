"""POD-ER keeps the pooled vectors it distils: the same loss as from raw feature maps for every
distillation_type, much smaller columns, the EMA refresh applied to the pooled vectors, and a
state pooled for another distillation_type refused at load."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import TensorDataset

from retain.learners.components import (
    POD_TYPES,
    WeightedPooledOutputDistillationLossComponent,
    pod_feature_name,
    pod_loss,
    pod_loss_pooled,
    pod_memory_vector,
    pod_pool,
)
from retain.memory import MemoryBatch
from retain.methods.er import PooledOutputDistillationExperienceReplayLearner
from retain.models import ResNet18

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def _layers(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, 5, 3, generator=g), torch.randn(6, 8, 2, 2, generator=g), torch.randn(6, 7, generator=g)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distillation_type", POD_TYPES)
def test_pooled_storage_gives_the_raw_map_loss_bit_for_bit(distillation_type: str, normalize: bool) -> None:
    current, stored_raw = _layers(0), _layers(1)
    reference = pod_loss(current, stored_raw, distillation_type, normalize)  # the raw-map computation
    component = WeightedPooledOutputDistillationLossComponent(0.5, True, distillation_type, normalize)
    columns = component.memory_features(stored_raw)
    assert sorted(columns) == sorted(pod_feature_name(i, distillation_type) for i in range(3))
    batch = MemoryBatch(torch.arange(6), torch.zeros(6, 1), torch.zeros(6, dtype=torch.long), columns)
    assert torch.equal(component.loss(torch.zeros(6, 2), batch, current), 0.5 * reference)
    pooled = [columns[pod_feature_name(i, distillation_type)] for i in range(3)]
    assert torch.equal(pod_loss_pooled(current, pooled, distillation_type, normalize), reference)
    assert reference.item() > 0


def test_a_fully_connected_layer_keeps_one_half_of_its_equal_spatial_halves() -> None:
    h = torch.randn(5, 7)
    assert torch.equal(pod_pool(h, "spatial"), torch.cat([pod_memory_vector(h, "spatial")] * 2, dim=1))
    assert pod_memory_vector(h, "spatial").shape == (5, 7) and pod_memory_vector(h, "width").shape == (5, 7)
    one_by_one = torch.randn(5, 3, 1, 1)
    assert pod_memory_vector(one_by_one, "spatial").shape == (5, 3)
    assert pod_memory_vector(torch.randn(5, 3, 2, 1), "spatial").shape == (5, 9)  # halves differ: both kept


def test_pooled_loss_refuses_a_layer_pooled_differently() -> None:
    current = _layers(0)
    stored = [pod_pool(h, "width") for h in _layers(1)]
    with pytest.raises(ValueError, match=r"POD: a layer pools to \(32,\) values per item, the memory stores \(12,\)"):
        pod_loss_pooled(current, stored, "spatial")


def _learner(gamma: float = 1.0, distillation_type: str = "spatial") -> PooledOutputDistillationExperienceReplayLearner:
    torch.manual_seed(0)
    model = ResNet18(num_outputs=3, width=8, in_channels=1)
    return PooledOutputDistillationExperienceReplayLearner(
        model=model, optimizer=SGD, memory_size=64, alpha=1.0, batch_size=8, memory_batch_size=8, seed=0,
        ema_memory_update_gamma=gamma, distillation_type=distillation_type,
    )  # fmt: skip


def _data(n: int, seed: int, side: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, side, side, generator=g), torch.randint(0, 3, (n,), generator=g))


def _step(learner, batch, i, optimizer) -> None:
    loss = learner.training_step(batch, i)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    learner.on_train_batch_end(loss, batch, i)


def _start(learner, data):
    learner.on_model_update_start(data, None)
    optimizer, _ = learner.configure_optimizers()
    learner.on_train_start()
    return optimizer


def test_the_memory_keeps_pooled_vectors_far_smaller_than_the_maps() -> None:
    learner = _learner()
    optimizer = _start(learner, _data(16, 1, side=32))
    raw_per_item = 0
    for i, batch in enumerate(learner.train_dataloader()):
        _step(learner, batch, i, optimizer)
        if i == 0:
            with torch.no_grad():
                learner.model(batch[0])
            raw_per_item = sum(f[0].numel() for f in learner.model.get_intermediate_representation())
    columns = {k: v for k, v in learner.memory.metadata.items() if k.startswith("pod_")}
    assert sorted(columns) == [pod_feature_name(i, "spatial") for i in range(4)]
    pooled_per_item = sum(v[0].numel() for v in columns.values())
    assert all(v.dim() == 2 for v in columns.values())  # one vector per item and layer
    assert pooled_per_item * 7 <= raw_per_item, (pooled_per_item, raw_per_item)  # 2,048 vs 15,360 values
    assert learner.required_memory_metadata() == {pod_feature_name(0, "spatial"): None}


def test_ema_refresh_averages_the_pooled_vectors() -> None:
    gamma = 0.6
    learner = _learner(gamma=gamma)
    optimizer = _start(learner, _data(24, 1))
    for i, batch in enumerate(learner.train_dataloader()):
        _step(learner, batch, i, optimizer)
    optimizer = _start(learner, _data(16, 2))
    drawn: list[MemoryBatch] = []
    real_sample = learner.memory.sample

    def recording(k: int) -> MemoryBatch | None:
        out = real_sample(k)
        if out is not None:
            drawn.append(out)
        return out

    learner.memory.sample = recording  # type: ignore[method-assign]
    batch = next(iter(learner.train_dataloader()))
    old = {k: v.clone() for k, v in learner.memory.metadata.items()}
    loss = learner.training_step(batch, 0)
    assert len(drawn) == 1  # POD's batch is the one joined to the new data
    with torch.no_grad():  # the replayed items' features as the step saw them: joined to the new batch
        n = batch[0].shape[0]
        learner.model(torch.cat([batch[0], drawn[0].inputs]))
        features = [f[n:] for f in learner.model.get_intermediate_representation()]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    learner.on_train_batch_end(loss, batch, 0)
    rows = drawn[0].indices
    for i, f in enumerate(features):
        name = pod_feature_name(i, "spatial")
        expected = gamma * old[name][rows] + (1 - gamma) * pod_memory_vector(f, "spatial")
        assert torch.allclose(learner.memory.metadata[name][rows], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, old[name][rows])  # the refresh moved them


def test_a_state_pooled_for_another_type_is_refused() -> None:
    learner = _learner(distillation_type="width")
    optimizer = _start(learner, _data(16, 1))
    for i, batch in enumerate(learner.train_dataloader()):
        _step(learner, batch, i, optimizer)
    meta, tensors = learner.memory.state_dict()
    other = _learner(distillation_type="spatial")
    with pytest.raises(ValueError, match=r"metadata column 'pod_spatial_0' is missing \(the method needs it\)"):
        other.memory.load_state_dict(meta, tensors, required_metadata=other.required_memory_metadata())
