"""An example config for `retain update` / `retain evaluate`: digits arriving in 5 chunks.

A scheduled job runs one update per chunk, each in its own process:

    RETAIN_CHUNK=0 retain update --config examples/digits_config.py --output-state state/v0
    RETAIN_CHUNK=1 retain update --config examples/digits_config.py --input-state state/v0 --output-state state/v1
    retain evaluate --config examples/digits_config.py --state state/v1
"""

import os

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import retain

METHOD = "derpp"
UPDATER_OPTIONS = {"memory_size": 200, "batch_size": 10, "max_epochs": 5, "alpha": 0.3, "beta": 0.5,
                   "loss_normalization": 0}


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    inputs = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return inputs, torch.tensor(data.target)


def model_fn() -> retain.ContinualModel:
    # The updater's `seed` covers what the update draws (data order, memory, dropout), not the
    # weights of the model it is given: seed them here, so the first update is repeatable (and a
    # killed first update resumes from its checkpoint). Later updates load the weights from the state.
    torch.manual_seed(0)
    return retain.MultiLayerPerceptron(num_inputs=64, num_outputs=10, hidden_sizes=[100, 100])


def optimizer_fn(params):
    return torch.optim.SGD(params, lr=0.05)


def train_dataset_fn() -> TensorDataset:
    chunk = int(os.environ.get("RETAIN_CHUNK", "0"))
    inputs, targets = _digits()
    keep = (targets // 2 == chunk) & (torch.arange(len(targets)) % 4 != 0)
    return TensorDataset(inputs[keep], targets[keep])


def test_dataset_fn() -> TensorDataset:
    inputs, targets = _digits()
    keep = torch.arange(len(targets)) % 4 == 0
    return TensorDataset(inputs[keep], targets[keep])
