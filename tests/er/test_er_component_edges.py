"""The ER-family components at their edges: what POD keeps in memory per layer shape, the metadata
columns a state must hold, the CLS teacher on a tie and its copies' task heads, EMA over
BatchNorm buffers, shrink-and-perturb's refusal, dtype and saved generator, and the strict
loading of CLS-ER's copies."""

from __future__ import annotations

import re

import pytest
import torch
from test_er_components import memory_batch
from torch import nn

from retain.learners.base import new_checkpoint
from retain.learners.components import (
    Component,
    ShrinkAndPerturbReinitializationComponent,
    WeightedCLSLossComponent,
    WeightedPooledOutputDistillationLossComponent,
    ema_update,
    feature_name,
    pod_loss_pooled,
    pod_memory_vector,
    pod_pool,
)
from retain.models import MultiLayerPerceptron


def test_feature_names_number_the_intermediate_representations() -> None:
    assert [feature_name(i) for i in (0, 3)] == ["intermediate_representation_0", "intermediate_representation_3"]


def test_only_the_logit_and_feature_components_ask_for_stored_columns() -> None:
    assert (Component.needs_logits, Component.needs_features) == (False, False)
    pod = WeightedPooledOutputDistillationLossComponent(1.0, True, distillation_type="width")
    assert pod.needs_features and not pod.needs_logits


# ------------------------------------------------------------------ what POD keeps per layer
@pytest.mark.parametrize(
    ("shape", "kept"),
    [
        ((2, 5), (2, 5)),  # a fully connected layer: its squared activations, once (not twice)
        ((2, 3, 1, 1), (2, 3)),  # a 1x1 map is the same: C values
        ((2, 3, 2, 1), (2, 3 * 1 + 3 * 2)),  # H = 2, W = 1: [sum over H (C x W), sum over W (C x H)]
        ((2, 3, 1, 2), (2, 3 * 2 + 3 * 1)),
        ((2, 3, 2, 2), (2, 12)),
    ],
)
def test_pod_keeps_one_half_of_spatial_only_for_1x1_maps(shape: tuple[int, ...], kept: tuple[int, int]) -> None:
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    vector = pod_memory_vector(h, "spatial")
    assert vector.shape == kept
    pooled = pod_pool(h, "spatial")
    expected = pooled[:, : pooled.shape[1] // 2] if kept[1] * 2 == pooled.shape[1] else pooled
    assert torch.equal(vector, expected)
    # other types are stored as pooled, halves or not
    assert torch.equal(pod_memory_vector(h, "channel"), pod_pool(h, "channel"))
    # the loss against the kept vector is the loss against the raw map: 0 against itself
    assert pod_loss_pooled([h], [vector], "spatial", normalize=False).item() == 0.0


def test_pod_loss_against_a_stored_half_equals_the_loss_against_the_whole_vector() -> None:
    g = torch.Generator().manual_seed(1)
    current, stored = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    half = pod_memory_vector(stored, "spatial")
    whole = pod_pool(stored, "spatial")
    for normalize in (False, True):
        a = pod_loss_pooled([current], [half], "spatial", normalize)
        b = pod_loss_pooled([current], [whole], "spatial", normalize)
        torch.testing.assert_close(a, b)
    assert a.dtype == torch.float32


def test_pod_loss_is_float32_for_float64_features() -> None:
    h = torch.randn(2, 3, dtype=torch.float64)
    assert pod_loss_pooled([h], [pod_memory_vector(h + 1, "spatial")], "spatial").dtype == torch.float32


def test_pod_refuses_other_layer_counts_and_shapes_than_the_memorys() -> None:
    h = torch.randn(2, 3)
    with pytest.raises(ValueError, match="the model exposes 2 layers but the memory stores 1"):
        pod_loss_pooled([h, h], [pod_pool(h, "flat")], "flat")
    with pytest.raises(ValueError, match=re.escape("a layer pools to (3,) values per item, the memory stores (4,)")):
        pod_loss_pooled([h], [torch.randn(2, 4)], "flat")
    message = "POD needs features of shape (B, D) or (B, C, H, W), got (2, 3, 4)"
    with pytest.raises(ValueError, match=re.escape(message)):
        pod_pool(torch.randn(2, 3, 4), "flat")


@pytest.mark.parametrize("distillation_type", ["spatial", "width"])
def test_pod_requires_its_first_layers_column_of_its_own_type(distillation_type: str) -> None:
    pod = WeightedPooledOutputDistillationLossComponent(1.0, True, distillation_type=distillation_type)
    assert pod.required_memory_metadata() == {f"pod_{distillation_type}_0": None}
    columns = pod.memory_features([torch.ones(2, 3), torch.ones(2, 3, 2, 2)])
    assert list(columns) == [f"pod_{distillation_type}_0", f"pod_{distillation_type}_1"]


# ------------------------------------------------------------------ CLS-ER
def _linear(weight: list[list[float]]) -> MultiLayerPerceptron:
    model = MultiLayerPerceptron(num_inputs=2, num_outputs=3, hidden_sizes=())
    with torch.no_grad():
        model.heads["default_task"].weight.copy_(torch.tensor(weight))
        model.heads["default_task"].bias.zero_()
    return model


def test_on_a_tie_the_cls_teacher_is_the_plastic_copy() -> None:
    """The stable copy teaches only where its probability of the true class is strictly higher
    (as in the CLS-ER code: ``where(p_stable > p_plastic, stable, plastic)``)."""
    component = WeightedCLSLossComponent(1.0, False, model=_linear([[0.0, 0.0]] * 3))
    with torch.no_grad():  # x = (1, 0): stable logits (1, 0, 0), plastic (0, 1, 0): equal p of class 2
        component.stable_model.heads["default_task"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        component.plastic_model.heads["default_task"].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]])
    p_stable = component.stable_model(x).softmax(1)[0, 2]
    p_plastic = component.plastic_model(x).softmax(1)[0, 2]
    assert p_stable.item() == p_plastic.item()
    outputs = torch.tensor([[1.0, 0.0, 0.0]])  # equal to the stable copy's logits: 0 if it taught
    value = component.loss(outputs, memory_batch(x, torch.tensor([2])), [])
    assert value.item() == pytest.approx(2.0 / 3.0, rel=1e-6)  # (1 - 0)^2 + (0 - 1)^2 over 3 classes


def test_cls_copies_get_a_frozen_copy_of_a_new_tasks_head_and_use_it() -> None:
    torch.manual_seed(0)
    working = MultiLayerPerceptron(num_inputs=2, num_outputs=3, hidden_sizes=(4,))
    component = WeightedCLSLossComponent(1.0, False, model=working)
    working.add_task_params("t1")
    with torch.no_grad():
        working.heads["t1"].weight.mul_(5.0)
    component.on_model_update_start(working, "t1")
    assert component.task_id == "t1"
    for copy_model in (component.stable_model, component.plastic_model):
        assert copy_model.task_ids == ["default_task", "t1"]
        head = copy_model.heads["t1"]
        assert torch.equal(head.weight, working.heads["t1"].weight) and head.weight is not working.heads["t1"].weight
        assert not any(p.requires_grad for p in head.parameters())
    # the consistency term runs the copies through the task's head (zero against their own logits)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = component.stable_model(x, "t1")
    value = component.loss(teacher, memory_batch(x, torch.tensor([0, 1, 2])), [])
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        default = component.stable_model(x)
    assert not torch.allclose(default, teacher)  # another head would not give 0


def test_cls_copies_load_strictly() -> None:
    component = WeightedCLSLossComponent(0.1, False, model=_linear([[0.0, 0.0]] * 3))
    checkpoint = new_checkpoint()
    component.on_save_checkpoint(checkpoint, prefix="c.")
    del checkpoint["tensors"]["c.stable_model.heads.default_task.bias"]
    other = WeightedCLSLossComponent(0.1, False, model=_linear([[1.0, 1.0]] * 3))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"heads.default_task.bias\""):
        other.on_load_checkpoint(checkpoint, prefix="c.")


# ------------------------------------------------------------------ EMA with buffers
def _bn_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.train()
    model(torch.randn(8, 3))  # moves the running statistics and the step counter
    return model


def test_ema_averages_float_buffers_and_copies_the_others() -> None:
    target, source = _bn_model(0), _bn_model(1)
    source(torch.randn(8, 3))  # a second batch: num_batches_tracked 2 vs 1
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, source, 0.75)
    after, src = target.state_dict(), source.state_dict()
    for key in ("1.running_mean", "1.running_var", "0.weight", "1.bias"):
        torch.testing.assert_close(after[key], 0.75 * before[key] + 0.25 * src[key])
    assert after["1.num_batches_tracked"].item() == 2  # copied, not averaged


def test_ema_refuses_models_of_other_shapes() -> None:
    torch.manual_seed(0)
    with_buffers = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, affine=False))
    plain = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="argument 2 is shorter than argument 1"):
        ema_update(with_buffers, plain, 0.5)
    with pytest.raises(ValueError, match="EMA between models with 2 and 4 parameters and float buffers"):
        ema_update(plain, nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.5)


# ------------------------------------------------------------------ shrink and perturb
def test_shrink_and_perturb_refuses_a_negative_sigma_and_adds_no_loss() -> None:
    with pytest.raises(ValueError, match=re.escape("sigma must be >= 0, got -0.1")):
        ShrinkAndPerturbReinitializationComponent(0.9, -0.1)
    sp = ShrinkAndPerturbReinitializationComponent(0.9, 0.0)
    assert (sp.weight, sp.sample_new_memory_batch, sp.is_loss) == (0.0, False, False)


def test_shrink_and_perturb_draws_noise_in_the_parameters_dtype() -> None:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(num_inputs=3, num_outputs=2, hidden_sizes=(4,)).double()
    initial = [p.detach().clone() for p in model.parameters()]
    component = ShrinkAndPerturbReinitializationComponent(0.5, 0.1, seed=4)
    replay = torch.Generator().manual_seed(4)
    component.on_train_start(model)
    for p, w in zip(model.parameters(), initial, strict=True):
        noise = torch.randn(p.shape, generator=replay, dtype=torch.float64)
        torch.testing.assert_close(p.detach(), 0.5 * w + 0.1 * noise, rtol=0, atol=1e-15)


def test_shrink_and_perturb_saves_and_restores_its_generator() -> None:
    """A component loaded from a checkpoint draws the noise the saved one would have drawn next."""

    def model() -> MultiLayerPerceptron:
        torch.manual_seed(0)
        return MultiLayerPerceptron(num_inputs=3, num_outputs=2, hidden_sizes=(4,))

    saved = ShrinkAndPerturbReinitializationComponent(1.0, 0.5, seed=1)
    saved.on_train_start(model())  # advance its generator once
    checkpoint = new_checkpoint()
    saved.on_save_checkpoint(checkpoint, prefix="sp.")
    assert list(checkpoint["tensors"]) == ["sp.generator_state"]
    loaded = ShrinkAndPerturbReinitializationComponent(1.0, 0.5, seed=99)
    loaded.on_load_checkpoint(checkpoint, prefix="sp.")
    a, b = model(), model()
    saved.on_train_start(a)
    loaded.on_train_start(b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
