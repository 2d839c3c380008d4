"""A fully connected network; the DER paper's MNIST net is ``MultiLayerPerceptron(784, 10, [100, 100])``."""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from retain.models.base import ContinualModel, register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@register_model
class MultiLayerPerceptron(ContinualModel):
    """Flattens its input, then Linear + activation per hidden size, then a linear head per task.

    The post-activation output of every hidden layer is an intermediate representation (shape
    (B, D)), so POD distils the hidden activations.
    """

    def __init__(
        self,
        num_inputs: int = 784,
        num_outputs: int = 10,
        hidden_sizes: list[int] | tuple[int, ...] = (100, 100),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; choose one of {sorted(_ACTIVATIONS)}")
        sizes = [int(num_inputs), *[int(h) for h in hidden_sizes]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = _ACTIVATIONS[activation]()
        self.num_features = sizes[-1]
        self.num_outputs = int(num_outputs)
        self.add_task_params()

    def get_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = self.activation(layer(x))
            self._intermediate_representation_cache.append(x)
        return x
