"""Any nn.Module is a model: a plain CNN with POD through ``feature_layers`` (forward hooks)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import retain
from retain.learners import components


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv2(self.conv1(x)))


def _images(chunk: int, n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(chunk)
    y = torch.randint(0, 2, (n,), generator=g) + 2 * chunk
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[:, 0, y, :] += 1.0
    return TensorDataset(x, y)


def _pod(model: nn.Module, **kw) -> retain.PooledOutputDistillationExperienceReplayModelUpdater:
    return retain.PooledOutputDistillationExperienceReplayModelUpdater(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.05), memory_size=16, memory_batch_size=8,
        batch_size=8, max_epochs=1, accelerator="cpu", alpha=1.0, **kw,
    )  # fmt: skip


def test_pod_distils_the_hooked_feature_maps_of_a_plain_cnn(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    updater = _pod(PlainCNN(), feature_layers=["conv1", "conv2.1"], output_state_folder=tmp_path / "s")
    updater.update(_images(0))
    memory = updater.learner.memory
    # the pooled vectors of the hooked layers: spatial POD of (C, H, W) keeps C*W + C*H values
    assert memory.metadata["pod_spatial_0"].shape[1:] == (4 * 8 + 4 * 8,)  # conv1's output (4, 8, 8)
    assert memory.metadata["pod_spatial_1"].shape[1:] == (6 * 4 + 6 * 4,)  # conv2's ReLU (6, 4, 4)
    losses = []
    real = components.pod_loss_pooled

    def spy(current, stored, *args):
        assert [tuple(t.shape[1:]) for t in current] == [(4, 8, 8), (6, 4, 4)]
        value = real(current, stored, *args)
        losses.append(float(value.detach()))
        return value

    monkeypatch.setattr(components, "pod_loss_pooled", spy)
    torch.manual_seed(1)
    again = _pod(PlainCNN(), feature_layers=["conv1", "conv2.1"], input_state_folder=tmp_path / "s")
    again.update(_images(1))
    assert losses and all(v > 0 for v in losses), "POD compared current and stored feature maps"
    assert isinstance(retain.load_model(tmp_path / "s", model=PlainCNN()), PlainCNN)


def test_pod_on_a_plain_module_without_feature_layers_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"POD needs intermediate representations.*feature_layers=\[\.\.\.\]"):
        _pod(PlainCNN()).update(_images(0))


def test_an_unknown_feature_layer_is_named() -> None:
    with pytest.raises(ValueError, match=r"feature_layers: PlainCNN has no submodule 'conv9'"):
        _pod(PlainCNN(), feature_layers=["conv9"])


def test_shipped_models_keep_their_own_features_and_take_hooks_when_asked() -> None:
    mlp = retain.MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=[5, 6])
    mlp(torch.zeros(2, 4))
    default = [tuple(t.shape) for t in mlp.get_intermediate_representation()]
    assert default, "the MLP exposes its hidden layers by default"
    mlp.use_feature_layers(["layers.0"])
    mlp(torch.zeros(2, 4))
    assert [tuple(t.shape) for t in mlp.get_intermediate_representation()] == [(2, 5)]


def test_a_module_that_is_not_a_model_is_refused_in_one_line() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch nn.Module .* got str"):
        retain.ExperienceReplayModelUpdater("bert", optimizer=torch.optim.SGD, memory_size=4)
