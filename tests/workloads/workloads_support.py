"""Data, models and updater builders shared by the workload tests and their subprocess worker.

Two small learnable problems of 4 classes over 2 chunks, with inputs of two structures:
``dict`` items ``({"x": (8,), "aux": (4,)}, label)`` and ``tuple`` items from a three-tensor
``TensorDataset`` (inputs ``(x, aux)``). The model is a plain ``nn.Module`` whose
``forward(x, aux)`` fits both (``m(**d)`` and ``m(*t)``), with a ``body`` submodule whose output
POD distils through ``feature_layers``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

import retain

METHODS = ("finetune", "joint", "er", "derpp", "pod", "cls", "super", "rd")
KINDS = ("dict", "tuple")


class TwoInputNet(nn.Module):
    """A plain module taking two tensors: ``head(body(cat(x, aux)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor, aux: Tensor) -> Tensor:
        return self.head(self.body(torch.cat([x, aux], dim=1)))


def fresh_model() -> TwoInputNet:
    torch.manual_seed(0)
    return TwoInputNet()


def _raw(chunk: int, n: int = 48) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + chunk)
    y = torch.randint(0, 2, (n,), generator=g) + 2 * chunk
    x = torch.randn(n, 8, generator=g) * 0.3
    x[torch.arange(n), y] += 2.0  # class c lights up feature c
    aux = torch.randn(n, 4, generator=g)
    return x, aux, y


class DictItems(Dataset):
    """Map-style items ``({"x": ..., "aux": ...}, label)`` (the DataLoader path)."""

    def __init__(self, chunk: int) -> None:
        self.x, self.aux, self.y = _raw(chunk)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        return {"x": self.x[i], "aux": self.aux[i]}, int(self.y[i])


def dataset(kind: str, chunk: int) -> Dataset:
    if kind == "dict":
        return DictItems(chunk)
    x, aux, y = _raw(chunk)
    return TensorDataset(x, aux, y)


def probe(kind: str) -> Any:
    """A fixed batch of inputs of ``kind`` to compare predictions on."""
    x, aux, _ = _raw(0, 6)
    return {"x": x, "aux": aux} if kind == "dict" else (x, aux)


def updater(method: str, input_state: Path | None, output_state: Path | None) -> retain.ModelUpdater:
    """The updater of ``method`` on a fresh ``TwoInputNet``, small enough to run in well under a second."""
    common: dict[str, Any] = {"batch_size": 8, "max_epochs": 2, "accelerator": "cpu", "seed": 3}
    replay = {"memory_size": 20, "memory_batch_size": 8}
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    classes: dict[str, tuple[type, dict[str, Any]]] = {
        "finetune": (retain.FineTuningModelUpdater, {}),
        "joint": (retain.JointModelUpdater, {}),
        "er": (retain.ExperienceReplayModelUpdater, replay),
        "derpp": (retain.DarkExperienceReplayModelUpdater, {**replay, "alpha": 0.5, "beta": 0.5}),
        "pod": (retain.PooledOutputDistillationExperienceReplayModelUpdater,
                {**replay, "feature_layers": ["body"], "distillation_type": "flat"}),
        "cls": (retain.CLSExperienceReplayModelUpdater, replay),
        "super": (retain.SuperExperienceReplayModelUpdater,
                  {**replay, "feature_layers": ["body", "body.0"], "pod_distillation_type": "flat"}),
        "rd": (retain.RepeatedDistillationModelUpdater, {"memory_size": 20, "consolidation_epochs": 3}),
    }  # fmt: skip
    cls, options = classes[method]
    if method == "rd":
        options = {**options, "seed": 3}
    return cls(
        fresh_model(), optimizer=optimizer, input_state_folder=input_state, output_state_folder=output_state,
        **common | options,
    )  # fmt: skip
