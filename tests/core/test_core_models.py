"""ContinualModel: recorded hyperparameters, the registry, task heads, the feature cache, ResNet-18."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from retain.models import (
    DEFAULT_TASK_ID,
    ContinualModel,
    MultiLayerPerceptron,
    ResNet18,
    rebuild_model,
    register_model,
    registered_models,
)


@register_model
class WideMLP(MultiLayerPerceptron):
    """A subclass of a registered model with its own signature and ``**kwargs`` passed through."""

    def __init__(self, width: int = 16, depth: int = 2, **kwargs) -> None:
        super().__init__(hidden_sizes=[width] * depth, **kwargs)


@register_model
class DeeperWideMLP(WideMLP):
    """A subclass of a subclass that adds an argument of its own."""

    def __init__(self, extra_depth: int = 1, width: int = 8, **kwargs) -> None:
        super().__init__(width=width, depth=2 + extra_depth, **kwargs)


@register_model
class TinyConvNet(ContinualModel):
    def __init__(self, channels: int = 4, num_outputs: int = 3, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.scale = scale
        self.num_features = channels
        self.num_outputs = num_outputs
        self.add_task_params()

    def get_features(self, x: Tensor) -> Tensor:
        out = torch.relu(self.conv(x))
        self._intermediate_representation_cache.append(out)
        return out.mean(dim=(2, 3)) * self.scale


def test_hyperparameters_are_the_constructor_arguments() -> None:
    model = MultiLayerPerceptron(64, 10, (32, 16))
    assert model.hyperparameters == {
        "num_inputs": 64,
        "num_outputs": 10,
        "hidden_sizes": [32, 16],
        "activation": "relu",
        "init": "xavier",
    }
    assert model.describe() == {
        "class": "MultiLayerPerceptron",
        "hyperparameters": model.hyperparameters,
        "task_ids": [DEFAULT_TASK_ID],
    }
    model.hyperparameters["num_inputs"] = 1  # a copy: the recorded values cannot be edited through it
    assert model.hyperparameters["num_inputs"] == 64


def test_hyperparameters_of_subclasses_and_kwargs() -> None:
    wide = WideMLP(width=12, num_inputs=20, activation="tanh")
    assert wide.hyperparameters == {"width": 12, "depth": 2, "num_inputs": 20, "activation": "tanh"}
    assert [layer.out_features for layer in wide.layers] == [12, 12]
    deeper = DeeperWideMLP(extra_depth=2, num_outputs=4, num_inputs=6)
    assert deeper.hyperparameters == {"extra_depth": 2, "width": 8, "num_outputs": 4, "num_inputs": 6}
    assert [layer.out_features for layer in deeper.layers] == [8, 8, 8, 8]
    assert deeper.describe()["class"] == "DeeperWideMLP"


def test_non_json_hyperparameter_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"MultiLayerPerceptron.*JSON"):
        MultiLayerPerceptron(hidden_sizes=torch.tensor([3, 3]))
    with pytest.raises(TypeError, match=r"WideMLP.*JSON"):
        WideMLP(activation=nn.ReLU)
    with pytest.raises(TypeError, match="JSON"):
        TinyConvNet(scale=float("nan"))  # NaN is not JSON: the manifest could not be written later


@pytest.mark.parametrize(
    "model",
    [
        lambda: MultiLayerPerceptron(20, 5, [7, 6], activation="gelu"),
        lambda: DeeperWideMLP(extra_depth=0, num_inputs=20, num_outputs=5),
        lambda: TinyConvNet(channels=5, scale=0.5),
    ],
)
def test_registry_rebuilds_the_same_model(model) -> None:
    torch.manual_seed(0)
    original = model()
    original.add_task_params("task_b")
    rebuilt = rebuild_model(original.describe())
    assert type(rebuilt) is type(original)
    assert rebuilt.describe() == original.describe()
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = torch.rand(3, 1, 4, 5)
    for task_id in (None, "task_b"):
        assert torch.equal(rebuilt(x, task_id), original(x, task_id))


def test_registry_refuses_unknown_and_clashing_classes() -> None:
    assert registered_models()["WideMLP"] is WideMLP
    with pytest.raises(ValueError, match=r"NotAModel.*not registered"):
        rebuild_model({"class": "NotAModel", "hyperparameters": {}, "task_ids": []})

    class WideMLP2(MultiLayerPerceptron):
        pass

    WideMLP2.__name__ = "WideMLP"
    with pytest.raises(ValueError, match="already registered"):
        register_model(WideMLP2)
    with pytest.raises(TypeError, match="ContinualModel"):
        register_model(nn.Linear)  # type: ignore[arg-type]
    assert registered_models()["WideMLP"] is WideMLP


def test_add_task_params_is_idempotent_and_checks_ids() -> None:
    model = MultiLayerPerceptron(8, 3, [4])
    model.add_task_params("task-1")
    head = model.heads["task-1"]
    weight = head.weight.detach().clone()
    model.add_task_params("task-1")
    model.add_task_params(None)
    assert model.heads["task-1"] is head and torch.equal(head.weight, weight)
    assert model.task_ids == [DEFAULT_TASK_ID, "task-1"]
    for bad in ["../x", "a/b", "a b", "tâche", 5, ["t"]]:
        with pytest.raises(ValueError, match="task_id"):
            model.add_task_params(bad)  # type: ignore[arg-type]
    assert model.task_ids == [DEFAULT_TASK_ID, "task-1"]


def test_new_head_follows_the_model_dtype() -> None:
    model = MultiLayerPerceptron(8, 3, [4]).double()
    model.add_task_params("t2")
    assert model.heads["t2"].weight.dtype == torch.float64
    assert model(torch.rand(2, 8, dtype=torch.float64), "t2").shape == (2, 3)


def test_intermediate_representation_cache_holds_only_the_last_forward() -> None:
    model = MultiLayerPerceptron(6, 3, [5, 4])
    model(torch.rand(7, 6))
    x = torch.rand(2, 6)
    model(x)
    features = model.get_intermediate_representation()
    assert [tuple(f.shape) for f in features] == [(2, 5), (2, 4)]
    h1 = torch.relu(model.layers[0](x))
    assert torch.allclose(features[0], h1) and torch.allclose(features[1], torch.relu(model.layers[1](h1)))
    model.get_logits(torch.rand(3, 6))
    assert [tuple(f.shape) for f in model.get_intermediate_representation()] == [(3, 5), (3, 4)]


def test_resnet18_width_20_shapes() -> None:
    torch.manual_seed(0)
    model = ResNet18(num_outputs=10, width=20, in_channels=3)
    assert model.hyperparameters == {"num_outputs": 10, "width": 20, "in_channels": 3}
    assert model.num_features == 160
    logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [tuple(f.shape) for f in model.get_intermediate_representation()] == [
        (2, 20, 32, 32),
        (2, 40, 16, 16),
        (2, 80, 8, 8),
        (2, 160, 4, 4),
    ]
    gray = ResNet18(num_outputs=5, width=20, in_channels=1)
    assert gray(torch.rand(1, 1, 28, 28)).shape == (1, 5)
    # The reduced ResNet-18 of GEM/DER (nf=20): 4 stages of 2 basic blocks, ~1.1M parameters.
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.1e6, rel=0.05)


def test_mlp_xavier_init_is_the_der_papers_and_survives_reset() -> None:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(784, 10, (100, 100))
    bound = (6 / (784 + 100)) ** 0.5  # xavier_uniform for the first layer
    first = model.layers[0]
    assert float(first.weight.abs().max()) <= bound
    assert float(first.weight.abs().max()) > 0.9 * bound  # torch's default bound, 1/sqrt(784), is far below
    assert torch.count_nonzero(first.bias) == 0
    assert torch.count_nonzero(model.heads[DEFAULT_TASK_ID].bias) == 0
    model.add_task_params("other")
    assert torch.count_nonzero(model.heads["other"].bias) == 0
    with torch.no_grad():
        first.bias.fill_(1.0)
    model.reset_parameters()
    assert torch.count_nonzero(first.bias) == 0
    torch_init = MultiLayerPerceptron(784, 10, (100, 100), init="torch")
    assert float(torch_init.layers[0].weight.abs().max()) <= 1 / 784**0.5
    with pytest.raises(ValueError, match="init"):
        MultiLayerPerceptron(init="he")
