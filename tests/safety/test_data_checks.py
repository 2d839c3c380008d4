"""Data is checked everywhere, not only at its first batch (issue: safe output paths, finding 6):
labels of any integer dtype work, a bad label or a NaN anywhere in a map-style dataset or a stream
is a one-line ValueError naming the item, raised before any state is written, and every updater
refuses an empty dataset."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import retain
from retain.state import StateFolder

UPDATERS: dict[str, tuple[type, dict[str, Any]]] = {
    "finetune": (retain.FineTuningModelUpdater, {}),
    "joint": (retain.JointModelUpdater, {}),
    "er": (retain.ExperienceReplayModelUpdater, {"memory_size": 20}),
    "derpp": (retain.DarkExperienceReplayModelUpdater, {"memory_size": 20}),
    "pod": (retain.PooledOutputDistillationExperienceReplayModelUpdater, {"memory_size": 20}),
    "cls": (retain.CLSExperienceReplayModelUpdater, {"memory_size": 20}),
    "super": (retain.SuperExperienceReplayModelUpdater, {"memory_size": 20}),
    "rd": (retain.RepeatedDistillationModelUpdater, {"memory_size": 20}),
}


class MapDataset(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]


class Stream(IterableDataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self):
        yield from zip(self.inputs, self.targets, strict=True)


def _updater(name: str, output: Path | None = None) -> Any:
    cls, extra = UPDATERS[name]
    torch.manual_seed(0)
    return cls(retain.MultiLayerPerceptron(4, 3, [8]), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
               batch_size=8, max_epochs=1, progress_bar=False, output_state_folder=output, **extra)  # fmt: skip


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_every_updater_refuses_an_empty_dataset(name: str, tmp_path: Path) -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="train_dataset is empty: an update needs at least one item"):
        _updater(name, tmp_path / "out").update(TensorDataset(x[:0], y[:0]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("kind", ["tensor", "map"])
def test_labels_of_any_integer_dtype_train(dtype: torch.dtype, kind: str, tmp_path: Path) -> None:
    x, y = _data()
    data = TensorDataset(x, y.to(dtype)) if kind == "tensor" else MapDataset(x, y.to(dtype))
    _updater("derpp", tmp_path / "out").update(data)
    assert StateFolder(tmp_path / "out").manifest["updates_done"] == 1


@pytest.mark.parametrize("name", ["finetune", "er", "derpp", "rd"])
def test_a_bad_label_in_the_last_item_of_a_map_dataset_names_the_item(name: str, tmp_path: Path) -> None:
    x, y = _data()
    y[39] = 3  # the model has 3 classes; the first batches are fine
    with pytest.raises(ValueError, match=r"^train_dataset: item 39: label 3 lies outside \[0, 2\] for this model$"):
        _updater(name, tmp_path / "out").update(MapDataset(x, y))
    assert not (tmp_path / "out").exists()


def test_a_nan_anywhere_in_a_map_dataset_names_the_item(tmp_path: Path) -> None:
    x, y = _data()
    x[33, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^train_dataset: item 33: its inputs contain NaN or Inf$"):
        _updater("er", tmp_path / "out").update(MapDataset(x, y))
    assert not (tmp_path / "out").exists()


def test_a_bad_item_of_a_stream_is_named_by_its_position(tmp_path: Path) -> None:
    x, y = _data()
    y[30] = -1
    with pytest.raises(ValueError, match=r"^train_dataset: item 30 of the stream: label -1 lies outside"):
        _updater("er", tmp_path / "out").update(Stream(x, y))
    assert not (tmp_path / "out").exists()


def test_a_nan_in_a_validation_item_past_the_first_batch_is_refused_before_the_state(tmp_path: Path) -> None:
    x, y = _data()
    vx, vy = _data(300)  # validation batches are 256 items: item 290 is in the second
    vx[290, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^val_dataset: item 290: its inputs contain NaN or Inf$"):
        _updater("er", tmp_path / "out").update(TensorDataset(x, y), MapDataset(vx, vy))
    assert not (tmp_path / "out").exists()


def test_tensor_datasets_name_the_first_bad_item(tmp_path: Path) -> None:
    x, y = _data()
    x[17, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^train_dataset: item 17: inputs contain NaN or Inf$"):
        _updater("er").update(TensorDataset(x, y))
    x, y = _data()
    y[21] = 7
    message = r"labels must lie in \[0, 2\] for this model, found \[0, 7\] \(first at item 21\)"
    with pytest.raises(ValueError, match=message):
        _updater("er").update(TensorDataset(x, y))
