"""double_distillation_loss: DMC's loss against hand-computed values, its invariance, its shape."""

from __future__ import annotations

import pytest
import torch

from retain.methods.repeated_distill import double_distillation_loss


def test_rd_loss_matches_hand_computation() -> None:
    predicted = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    target = torch.tensor([[2.0, 4.0, 6.0], [1.0, 1.0, 4.0]])
    # sample 0: target mean 4 -> [-2, 0, 2]; pred - t = [3, 2, 1]; 0.5 * (9 + 4 + 1) / 3 = 7/3
    # sample 1: target mean 2 -> [-1, -1, 2]; pred - t = [1, 0, 0]; 0.5 * (1 + 0 + 0) / 3 = 1/6
    loss = double_distillation_loss(predicted, target)
    torch.testing.assert_close(loss, torch.tensor([7.0 / 3.0, 1.0 / 6.0]))


def test_rd_loss_ignores_a_constant_added_to_a_samples_targets() -> None:
    g = torch.Generator().manual_seed(0)
    predicted = torch.randn(3, 5, generator=g)
    target = torch.randn(3, 5, generator=g)
    shifted = target + torch.tensor([[4.0], [-7.5], [0.25]])
    base = double_distillation_loss(predicted, target)
    assert bool((base > 0).all())
    torch.testing.assert_close(double_distillation_loss(predicted, shifted), base)
    # a shift of the predictions is not normalised away
    assert not torch.allclose(double_distillation_loss(predicted + 1.0, target), base)


def test_rd_loss_has_one_value_per_item_and_gradients() -> None:
    predicted = torch.randn(4, 7, requires_grad=True)
    loss = double_distillation_loss(predicted, torch.randn(4, 7))
    assert loss.shape == (4,)
    loss.mean().backward()
    assert predicted.grad is not None and bool(predicted.grad.abs().sum() > 0)


def test_rd_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        double_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
