"""Each loss is reduced as documented (a mean, not a sum) on tensors small enough to check by hand,
and Repeated Distillation's own options set its two training phases.

Hand values: for logits (0, 0) and (ln 3, 0) with targets 0 and 1 the cross-entropies are ln 2 and
ln 4 (mean 1.5 ln 2, sum 3 ln 2); for a zero output against target logits (1, -1, 0) and (2, 2, 2) the
double distillation losses are 1/3 and 0 (mean 1/6, sum 1/3).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.methods import FineTuningModelUpdater, RepeatedDistillationModelUpdater
from retain.methods.repeated_distill import RepeatedDistillationLearner

SGD = functools.partial(torch.optim.SGD, lr=0.1)
LOGITS = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
TARGETS = torch.tensor([0, 1])


def linear(num_outputs: int = 2, num_inputs: int = 2) -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(num_inputs=num_inputs, num_outputs=num_outputs, hidden_sizes=())


def test_base_loss_is_the_mean_over_items() -> None:
    learner = FineTuningModelUpdater(linear(), optimizer=SGD, accelerator="cpu").learner
    assert float(learner.base_loss(LOGITS, TARGETS)) == pytest.approx(1.5 * math.log(2.0), rel=1e-6)


def test_a_custom_per_item_loss_is_averaged_too() -> None:
    def per_item(outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.tensor([1.0, 5.0]) + 0 * outputs.sum()

    learner = FineTuningModelUpdater(linear(), per_item, optimizer=SGD, accelerator="cpu").learner
    assert float(learner.base_loss(LOGITS, TARGETS)) == pytest.approx(3.0)


def test_the_validation_loss_is_the_mean_over_items() -> None:
    """val_loss after the last epoch: the served model's mean cross-entropy on the validation items."""
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(12, 2, generator=g), torch.randint(0, 2, (12,), generator=g))
    val = TensorDataset(torch.randn(7, 2, generator=g), torch.randint(0, 2, (7,), generator=g))
    updater = FineTuningModelUpdater(linear(), optimizer=SGD, batch_size=4, max_epochs=2, accelerator="cpu")
    model = updater.update(train, val)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(val.tensors[0]), val.tensors[1])
    assert updater.last_fit is not None
    assert updater.last_fit.history[-1]["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    hits = float((model(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean())
    assert updater.last_fit.history[-1]["val_accuracy"] == pytest.approx(hits)


def test_consolidation_loss_is_the_batch_mean_of_double_distillation() -> None:
    model = linear(num_outputs=3)
    updater = RepeatedDistillationModelUpdater(model, optimizer=SGD, memory_size=4, accelerator="cpu")
    with torch.no_grad():
        for p in updater.learner.model.parameters():
            p.zero_()  # the model's logits are 0 for every input
    targets = torch.tensor([[1.0, -1.0, 0.0], [2.0, 2.0, 2.0]])
    loss = updater.learner.training_step((torch.randn(2, 2), targets), 0)
    assert float(loss.detach()) == pytest.approx(1.0 / 6.0, rel=1e-6)


def test_rd_phases_follow_their_own_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The expert trains max_epochs epochs in batches of batch_size on the new data; the consolidation
    consolidation_epochs epochs in batches of consolidation_batch_size on the memory."""
    batches: dict[str, list[int]] = {"expert": [], "consolidation": []}
    real = RepeatedDistillationLearner.training_step

    def consolidation_step(self: Any, batch: Any, batch_idx: int) -> Tensor:
        batches["consolidation"].append(len(batch[0]))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(RepeatedDistillationLearner, "training_step", consolidation_step)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(10, 2, generator=g), torch.randint(0, 3, (10,), generator=g))
    updater = RepeatedDistillationModelUpdater(
        linear(num_outputs=3), optimizer=SGD, memory_size=8, consolidation_epochs=3, consolidation_batch_size=5,
        batch_size=4, max_epochs=2, accelerator="cpu", seed=0,
    )  # fmt: skip
    real_expert = updater.train_expert

    def train_expert(train_dataset: Any, task_id: Any = None, collate_fn: Any = None) -> Any:
        expert = real_expert(train_dataset, task_id, collate_fn)
        assert updater.last_expert_fit is not None
        batches["expert"] = [updater.last_expert_fit.steps, updater.last_expert_fit.epochs]
        return expert

    updater.train_expert = train_expert  # type: ignore[method-assign]
    updater.update(data)
    assert batches["expert"] == [2 * 3, 2]  # 2 epochs of ceil(10 / 4) steps
    assert batches["consolidation"] == [5, 3] * 3  # 3 epochs over the 8 memory items in batches of 5
    assert updater.last_fit is not None and updater.last_fit.epochs == 3


def test_ema_averages_float_buffers_and_copies_counters() -> None:
    """CLS-ER's copies of a BatchNorm model: running statistics follow the EMA like the weights,
    the integer step counter is copied."""
    from retain.learners.components import ema_update

    target, source = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([1.0, 2.0]))
        source.weight.copy_(torch.tensor([3.0, 6.0]))
    target.running_mean.copy_(torch.tensor([4.0, 8.0]))
    source.running_mean.copy_(torch.tensor([0.0, 4.0]))
    target.running_var.fill_(1.0)
    source.running_var.fill_(5.0)
    source.num_batches_tracked.fill_(7)
    ema_update(target, source, 0.75)
    assert torch.equal(target.weight.detach(), torch.tensor([1.5, 3.0]))
    assert torch.equal(target.running_mean, torch.tensor([3.0, 7.0]))
    assert torch.equal(target.running_var, torch.tensor([2.0, 2.0]))
    assert int(target.num_batches_tracked) == 7
