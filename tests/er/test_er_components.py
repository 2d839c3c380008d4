"""The ER-family components against their papers' formulas, on tensors small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from retain.learners.components import (
    POD_TYPES,
    Component,
    ShrinkAndPerturbReinitializationComponent,
    WeightedCLSLossComponent,
    WeightedCustomLossComponent,
    WeightedMeanSquaredErrorLossComponent,
    WeightedPooledOutputDistillationLossComponent,
    ema_update,
    pod_feature_name,
    pod_loss,
    pod_pool,
)
from retain.memory import MemoryBatch
from retain.models import MultiLayerPerceptron


def memory_batch(inputs: Tensor, targets: Tensor, **metadata: Tensor) -> MemoryBatch:
    return MemoryBatch(torch.arange(inputs.shape[0]), inputs, targets, dict(metadata))


# ------------------------------------------------------------------ ER / DER terms
def test_custom_loss_is_weight_times_mean_cross_entropy() -> None:
    # Item 0: logits (0, 0, 0), target 0 -> CE = ln 3.
    # Item 1: logits (ln 2, 0, 0), target 2 -> p = 1 / (2 + 1 + 1) -> CE = ln 4.
    outputs = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    component = WeightedCustomLossComponent(nn.CrossEntropyLoss(reduction="none"), 0.5, sample_new_memory_batch=True)
    value = component.loss(outputs, memory_batch(torch.zeros(2, 1), targets), [])
    assert value.item() == pytest.approx(0.5 * (math.log(3.0) + math.log(4.0)) / 2, rel=1e-6)


def test_mse_loss_is_weight_times_mean_over_items_and_classes() -> None:
    outputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stored = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # squared differences 1, 0, 4, 9 -> mean 14 / 4 = 3.5; weight 2 -> 7.
    component = WeightedMeanSquaredErrorLossComponent(2.0, sample_new_memory_batch=True)
    value = component.loss(outputs, memory_batch(torch.zeros(2, 1), torch.tensor([0, 1]), logits=stored), [])
    assert value.item() == pytest.approx(7.0)


def test_zero_weight_components_add_no_term() -> None:
    assert not WeightedMeanSquaredErrorLossComponent(0.0, sample_new_memory_batch=True).is_loss
    assert WeightedMeanSquaredErrorLossComponent(0.1, sample_new_memory_batch=True).is_loss
    assert not ShrinkAndPerturbReinitializationComponent(0.9, 0.01).is_loss


# ------------------------------------------------------------------ POD
H_MAP = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (B=1, C=1, H=2, W=2); rows are H, columns W


def test_pod_pool_spatial_by_hand() -> None:
    # squares [[1, 4], [9, 16]]: sum over H (per column) = (10, 20); sum over W (per row) = (5, 25).
    assert pod_pool(H_MAP, "spatial").tolist() == [[10.0, 20.0, 5.0, 25.0]]


def test_pod_pool_other_types_by_hand() -> None:
    assert pod_pool(H_MAP, "width").tolist() == [[10.0, 20.0]]  # PODNet's pod-width: a C x W vector
    assert pod_pool(H_MAP, "height").tolist() == [[5.0, 25.0]]  # C x H
    assert pod_pool(H_MAP, "channel").tolist() == [[1.0, 4.0, 9.0, 16.0]]
    assert pod_pool(H_MAP, "gap").tolist() == [[7.5]]  # mean of the squares, as PODNet's code pools
    assert pod_pool(H_MAP, "flat").tolist() == [[1.0, 4.0, 9.0, 16.0]]
    assert pod_pool(H_MAP, "pixel").tolist() == [[1.0, 4.0, 9.0, 16.0]]  # the spec's name for no pooling


@pytest.mark.parametrize(
    ("distillation_type", "width"),
    [("spatial", 3 * 5 + 3 * 4), ("width", 3 * 5), ("height", 3 * 4), ("channel", 4 * 5), ("gap", 3), ("flat", 60),
     ("pixel", 60)],
)
def test_pod_pool_shapes(distillation_type: str, width: int) -> None:
    h = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    assert pod_pool(h, distillation_type).shape == (2, width)


def test_pod_types_are_all_tested() -> None:
    assert set(POD_TYPES) == {"spatial", "width", "height", "channel", "gap", "flat", "pixel"}


def test_pod_pool_treats_2d_features_as_1x1_maps() -> None:
    h = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    for distillation_type in POD_TYPES:
        assert torch.equal(pod_pool(h, distillation_type), pod_pool(h[:, :, None, None], distillation_type))
    assert pod_pool(h, "spatial").tolist() == [[1.0, 4.0, 1.0, 4.0], [0.25, 9.0, 0.25, 9.0]]


def test_pod_loss_unnormalised_by_hand() -> None:
    current = torch.cat([H_MAP, H_MAP])  # two samples
    stored = torch.cat([torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), H_MAP])
    # sample 0: (10, 20, 5, 25) - (1, 0, 1, 0) = (9, 20, 4, 25) -> norm sqrt(1122); sample 1: 0.
    expected = math.sqrt(81 + 400 + 16 + 625) / 2
    assert pod_loss([current], [stored], "spatial", normalize=False).item() == pytest.approx(expected, rel=1e-6)


def test_pod_loss_normalised_by_hand_and_averaged_over_layers() -> None:
    current = H_MAP
    stored = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # unit vectors a = (10, 20, 5, 25) / sqrt(1150), b = (1, 0, 1, 0) / sqrt(2): |a - b|^2 = 2 - 2 a.b
    dot = (10 + 5) / (math.sqrt(1150) * math.sqrt(2))
    layer0 = math.sqrt(2 - 2 * dot)
    assert pod_loss([current], [stored], "spatial", normalize=True).item() == pytest.approx(layer0, rel=1e-6)
    # a second layer identical in both -> contributes 0, and the loss is the mean over the 2 layers
    two = pod_loss([current, H_MAP], [stored, H_MAP], "spatial", normalize=True)
    assert two.item() == pytest.approx(layer0 / 2, rel=1e-6)


def test_pod_component_is_weight_times_pod_loss() -> None:
    component = WeightedPooledOutputDistillationLossComponent(0.25, True, distillation_type="spatial", normalize=0)
    stored = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    stored_pooled = pod_pool(stored, "spatial")  # the memory keeps the pooled vector, not the map
    batch = memory_batch(torch.zeros(1, 1), torch.tensor([0]), **{pod_feature_name(0, "spatial"): stored_pooled})
    value = component.loss(torch.zeros(1, 2), batch, [H_MAP])
    assert value.item() == pytest.approx(0.25 * math.sqrt(1122), rel=1e-6)


def test_pod_unknown_type_raises() -> None:
    with pytest.raises(ValueError, match="bogus"):
        pod_pool(H_MAP, "bogus")
    with pytest.raises(ValueError, match="spatial"):
        WeightedPooledOutputDistillationLossComponent(1.0, True, distillation_type="bogus")


def test_pod_without_intermediate_representations_raises() -> None:
    with pytest.raises(ValueError, match="exposes none"):
        pod_loss([], [], "spatial")
    component = WeightedPooledOutputDistillationLossComponent(1.0, True)
    with pytest.raises(ValueError, match="exposes none"):
        component.loss(torch.zeros(1, 2), memory_batch(torch.zeros(1, 1), torch.tensor([0])), [])


# ------------------------------------------------------------------ CLS-ER
def linear_model(weight: list[list[float]]) -> MultiLayerPerceptron:
    """2 inputs -> 3 logits, no hidden layer: logits = x @ weight.T."""
    model = MultiLayerPerceptron(num_inputs=2, num_outputs=3, hidden_sizes=())
    with torch.no_grad():
        model.heads["default_task"].weight.copy_(torch.tensor(weight))
        model.heads["default_task"].bias.zero_()
    return model


def test_cls_teacher_is_the_copy_more_confident_in_the_true_class() -> None:
    working = linear_model([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    component = WeightedCLSLossComponent(0.5, False, model=working)
    with torch.no_grad():  # stable: x0 -> (2, 0, 0); plastic: x1 -> (0, 0, 3)
        component.stable_model.heads["default_task"].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        component.plastic_model.heads["default_task"].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 3.0]]))
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 2])
    # item 0 (class 0): stable p0 = e^2 / (e^2 + 2) > plastic p0 = 1/3 -> teacher (2, 0, 0)
    # item 1 (class 2): stable p2 = 1/3 < plastic p2 = e^3 / (e^3 + 2) -> teacher (0, 0, 3)
    outputs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # squared differences: (1, 0, 0) and (0, 1, 9) -> mean 11 / 6
    value = component.loss(outputs, memory_batch(inputs, targets), [])
    assert value.item() == pytest.approx(0.5 * 11 / 6, rel=1e-6)
    # labels (2, 0) flip the choice: item 0 (class 2): stable p2 = 1 / (e^2 + 2) < plastic p2 = 1/3 -> plastic
    # (0, 0, 0); item 1 (class 0): stable p0 = 1/3 > plastic p0 = 1 / (e^3 + 2) -> stable (0, 0, 0)
    value = component.loss(outputs, memory_batch(inputs, torch.tensor([2, 0])), [])
    assert value.item() == pytest.approx(0.5 * 2 / 6, rel=1e-6)


def test_ema_update_rule() -> None:
    target = linear_model([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    source = linear_model([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    ema_update(target, source, 0.75)
    expected = 0.75 * torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) + 0.25 * torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    )
    assert torch.allclose(target.heads["default_task"].weight, expected)


def test_cls_copies_follow_ema_with_decay_min_of_schedule_and_weight() -> None:
    working = linear_model([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    component = WeightedCLSLossComponent(
        0.1,
        False,
        model=working,
        plastic_model_update_weight=0.55,
        stable_model_update_weight=0.9,
        plastic_model_update_probability=1.0,
        stable_model_update_probability=1.0,
    )
    plastic = component.plastic_model.heads["default_task"].weight
    stable = component.stable_model.heads["default_task"].weight
    w_plastic, w_stable = 1.0, 1.0  # all entries equal: track one number per copy
    for step, value in enumerate([5.0, -3.0, 2.0], start=1):
        with torch.no_grad():
            working.heads["default_task"].weight.fill_(value)
        component.on_train_batch_end(working)
        schedule = 1.0 - 1.0 / (step + 1)  # 1/2, 2/3, 3/4
        d_plastic, d_stable = min(schedule, 0.55), min(schedule, 0.9)
        w_plastic = d_plastic * w_plastic + (1 - d_plastic) * value
        w_stable = d_stable * w_stable + (1 - d_stable) * value
        assert torch.allclose(plastic, torch.full_like(plastic, w_plastic)), step
        assert torch.allclose(stable, torch.full_like(stable, w_stable)), step
    assert component.step == 3
    assert component.served_model is component.stable_model


def test_cls_copy_with_probability_zero_never_changes() -> None:
    working = linear_model([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    component = WeightedCLSLossComponent(
        0.1, False, model=working, plastic_model_update_probability=1.0, stable_model_update_probability=0.0
    )
    before = component.stable_model.heads["default_task"].weight.clone()
    with torch.no_grad():
        working.heads["default_task"].weight.fill_(9.0)
    for _ in range(20):
        component.on_train_batch_end(working)
    assert torch.equal(component.stable_model.heads["default_task"].weight, before)
    assert not torch.equal(component.plastic_model.heads["default_task"].weight, before)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_cls_rejects_probabilities_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="stable_model_update_probability"):
        WeightedCLSLossComponent(0.1, False, model=linear_model([[0.0, 0.0]] * 3), stable_model_update_probability=bad)


# ------------------------------------------------------------------ shrink & perturb
def test_shrink_and_perturb_uses_its_generator() -> None:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(num_inputs=3, num_outputs=2, hidden_sizes=(4,))
    component = ShrinkAndPerturbReinitializationComponent(0.9, 0.01, seed=3)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(component.generator.get_state().clone())
    expected = [0.9 * p.detach().clone() + 0.01 * torch.randn(p.shape, generator=replay) for p in model.parameters()]
    shrunk = [0.9 * p.detach().clone() for p in model.parameters()]
    component.on_train_start(model)
    for p, e, s in zip(model.parameters(), expected, shrunk, strict=True):
        assert torch.allclose(p, e, atol=1e-7)
        assert not torch.allclose(p, s, atol=1e-4)  # the noise is there, not just the shrink


def test_the_base_component_adds_no_loss_no_served_model_and_no_metadata_columns() -> None:
    """A component that overrides nothing (the base a user's component starts from) contributes nothing:
    an empty dict of feature columns (merged into the memory's metadata), none required at load."""
    base = Component(weight=0.5)
    assert not base.is_loss and base.served_model is None
    assert base.memory_features([torch.ones(2, 3)]) == {}
    assert base.required_memory_metadata() == {}
