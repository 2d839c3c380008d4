"""Continuing from a state folder is bit-for-bit the same as continuing in the same object,
in the same process or in fresh processes."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    JointModelUpdater,
    ModelUpdater,
    MultiLayerPerceptron,
)

OPTIONS: dict[str, Any] = {"batch_size": 20, "max_epochs": 2, "seed": 7, "accelerator": "cpu"}
LR = 0.05
METHODS = {
    "FineTuning": (FineTuningModelUpdater, {}),
    "Joint": (JointModelUpdater, {}),
    "ER": (ExperienceReplayModelUpdater, {"memory_size": 40}),
    "DER++": (DarkExperienceReplayModelUpdater, {"memory_size": 40, "alpha": 0.5, "beta": 0.5}),
}


def _updater(
    cls: type[ModelUpdater], method_kwargs: dict, init_seed: int, input_folder: Path | None, output_folder: Path
) -> ModelUpdater:
    torch.manual_seed(init_seed)
    return cls(
        MultiLayerPerceptron(64, 10, [32]),
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        input_state_folder=input_folder,
        output_state_folder=output_folder,
        **method_kwargs,
        **OPTIONS,
    )


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


@pytest.mark.parametrize("method", list(METHODS))
def test_continuing_from_a_state_folder_equals_continuing_in_memory(method: str, digits_tasks, tmp_path: Path) -> None:
    cls, method_kwargs = METHODS[method]
    (train0, _), (train1, _) = digits_tasks[0], digits_tasks[1]
    a = _updater(cls, method_kwargs, init_seed=0, input_folder=None, output_folder=tmp_path / "s0")
    a.update(train0)
    after_first = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.output_state_folder = tmp_path / "a1"
    a.update(train1)

    # a fresh object, built from a model with other initial weights: everything must come from S0
    b = _updater(cls, method_kwargs, init_seed=99, input_folder=tmp_path / "s0", output_folder=tmp_path / "b1")
    b.update(train1)

    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert any(not torch.equal(after_first[k], state_a[k]) for k in state_a)  # the second update trained
    assert a.learner.global_step == b.learner.global_step > 0
    assert a.learner.updates_done == b.learner.updates_done == 2
    memory_a, memory_b = a.learner.memory_for_state(), b.learner.memory_for_state()
    assert (memory_a is None) == (memory_b is None)
    if memory_a is not None and memory_b is not None:
        # every step offers its new items, so each item is offered once per epoch
        assert memory_a.seen == memory_b.seen == OPTIONS["max_epochs"] * (len(train0) + len(train1))
        for x, y in zip(memory_a.raw_items()[:2], memory_b.raw_items()[:2], strict=True):
            assert torch.equal(x, y)
        meta_a, meta_b = memory_a.raw_items()[2], memory_b.raw_items()[2]
        assert meta_a.keys() == meta_b.keys()
        assert all(torch.equal(meta_a[k], meta_b[k]) for k in meta_a)
        assert set(memory_a.raw_items()[1].tolist()) == {0, 1, 2, 3}  # both tasks are in memory
    _assert_same_files(tmp_path / "a1", tmp_path / "b1")


_CHILD = """
import functools, json, sys
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from retain import DarkExperienceReplayModelUpdater, MultiLayerPerceptron

data, task, input_folder, output_folder, kwargs, lr = sys.argv[1:]
tensors = load_file(data)
torch.set_num_threads(1)  # as the test session (tests/conftest.py)
torch.manual_seed(0)
updater = DarkExperienceReplayModelUpdater(
    MultiLayerPerceptron(64, 10, [32]),
    optimizer=functools.partial(torch.optim.SGD, lr=float(lr)),
    input_state_folder=input_folder or None,
    output_state_folder=output_folder,
    **json.loads(kwargs),
)
updater.update(TensorDataset(tensors["x" + task], tensors["y" + task]))
"""


@pytest.mark.slow
def test_updates_in_separate_processes_give_the_same_weights(digits_tasks, tmp_path: Path) -> None:
    cls, method_kwargs = METHODS["DER++"]
    (train0, _), (train1, _) = digits_tasks[0], digits_tasks[1]
    data = tmp_path / "tasks.safetensors"
    save_file(
        {"x0": train0.tensors[0], "y0": train0.tensors[1], "x1": train1.tensors[0], "y1": train1.tensors[1]}, str(data)
    )
    kwargs = json.dumps({**method_kwargs, **OPTIONS})
    for task, input_folder, output_folder in [("0", "", "p0"), ("1", str(tmp_path / "p0"), "p1")]:
        subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(data),
                task,
                input_folder,
                str(tmp_path / output_folder),
                kwargs,
                str(LR),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    a = _updater(cls, method_kwargs, init_seed=0, input_folder=None, output_folder=tmp_path / "s0")
    a.update(train0)
    a.output_state_folder = tmp_path / "s1"
    a.update(train1)
    child_weights = load_file(str(tmp_path / "p1" / "model.safetensors"))
    in_process = a.model.state_dict()
    assert child_weights.keys() == in_process.keys()
    for key, value in in_process.items():
        assert torch.equal(child_weights[key], value), key
    _assert_same_files(tmp_path / "s1", tmp_path / "p1")
