"""A fully connected network; the DER paper's MNIST net is ``MultiLayerPerceptron(784, 10, [100, 100])``."""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from retain.models.base import ContinualModel, register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
INITS = ("xavier", "torch")


def _xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


@register_model
class MultiLayerPerceptron(ContinualModel):
    """Flattens its input, then Linear + activation per hidden size, then a linear head per task.

    The post-activation output of every hidden layer is an intermediate representation (shape
    (B, D)), so POD distils the hidden activations. ``init='xavier'`` (uniform Xavier weights, zero
    biases) is the initialisation of the DER paper's network (Mammoth's MNISTMLP); ``'torch'``
    keeps PyTorch's default for ``nn.Linear``.
    """

    def __init__(
        self,
        num_inputs: int = 784,
        num_outputs: int = 10,
        hidden_sizes: list[int] | tuple[int, ...] = (100, 100),
        activation: str = "relu",
        init: str = "xavier",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; choose one of {sorted(_ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"init {init!r} unknown; choose one of {', '.join(INITS)}")
        self.init = init
        sizes = [int(num_inputs), *[int(h) for h in hidden_sizes]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = _ACTIVATIONS[activation]()
        self.num_features = sizes[-1]
        self.num_outputs = int(num_outputs)
        self.add_task_params()
        if init == "xavier":
            for layer in self.layers:
                _xavier(layer)

    def make_head(self) -> nn.Module:
        head = super().make_head()
        if self.init == "xavier":
            _xavier(head)
        return head

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.init == "xavier":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    _xavier(module)

    def get_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = self.activation(layer(x))
            self._intermediate_representation_cache.append(x)
        return x
