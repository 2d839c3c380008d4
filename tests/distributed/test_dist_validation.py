"""Validation over the stored val data of earlier updates in a multi-process (DDP, gloo) update:
every rank validates on the union, rank 0 writes the new val chunk beside the linked old one."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from retain.methods import ExperienceReplayModelUpdater
from retain.models import MultiLayerPerceptron
from retain.state import StateFolder
from retain.val_history import val_chunk_name

OPTIONS: dict[str, Any] = {"memory_size": 10, "batch_size": 8, "max_epochs": 1, "seed": 3, "accelerator": "cpu"}


def data(k: int, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed + k)
    return TensorDataset(torch.randn(n, 8, generator=g), 2 * k + torch.randint(0, 2, (n,), generator=g))


def updater(state_in: Path | None, state_out: Path | None, **kw: Any) -> ExperienceReplayModelUpdater:
    torch.manual_seed(0)
    return ExperienceReplayModelUpdater(
        MultiLayerPerceptron(8, 6, [16]), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        input_state_folder=state_in, output_state_folder=state_out, **(OPTIONS | kw),
    )  # fmt: skip


@torch.no_grad()
def val_loss(net: nn.Module, parts: list[TensorDataset]) -> float:
    x: Tensor = torch.cat([p.tensors[0] for p in parts])
    y: Tensor = torch.cat([p.tensors[1] for p in parts])
    return float(nn.functional.cross_entropy(net.eval()(x), y))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_validate_on_the_stored_and_the_new_val_data(tmp_path: Path) -> None:
    updater(None, tmp_path / "s1").update(data(0, 24, 100), data(0, 16, 500))
    second = updater(tmp_path / "s1", tmp_path / "s2", devices=2, metric="val_loss")
    served = second.update(data(1, 24, 100), data(1, 16, 500))
    expected = val_loss(served, [data(0, 16, 500), data(1, 16, 500)])
    assert second.last_fit is not None
    assert second.last_fit.history[-1]["val_loss"] == pytest.approx(expected, abs=1e-6)
    assert StateFolder(tmp_path / "s2").json("learner.json")["val_chunks"] == [val_chunk_name(0), val_chunk_name(1)]
    first_chunk = [os.stat(tmp_path / s / val_chunk_name(0)).st_ino for s in ("s1", "s2")]
    assert first_chunk[0] == first_chunk[1]  # linked through the workers' temporary input, not rewritten
    # a third update on two ranks without val_dataset monitors the stored val data of both
    third = updater(tmp_path / "s2", None, devices=2, metric="val_loss")
    served = third.update(data(2, 24, 100))
    assert third.last_fit is not None
    expected = val_loss(served, [data(0, 16, 500), data(1, 16, 500)])
    assert third.last_fit.history[-1]["val_loss"] == pytest.approx(expected, abs=1e-6)
