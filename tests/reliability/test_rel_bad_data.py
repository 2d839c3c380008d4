"""Bad data and bad options fail clearly and change nothing on disk.

Each case starts from a real input state folder and an output path (absent, or holding an
older state) and must raise the named error; afterwards the input folder and any existing
output folder are byte-identical, no output folder appeared, and no temporary or resume folder
was left (the lock file may remain). Checks that can run before training do (data checks in
``on_model_update_start``, options in the constructor); a non-finite loss is found during
training and is reported with the step where it first happened.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rel_support import build_updater, siblings, snapshot, synthetic_data
from torch.utils.data import Dataset, TensorDataset

from retain import MultiLayerPerceptron, NonFiniteLossError, StateError
from retain.methods import DarkExperienceReplayModelUpdater, FineTuningModelUpdater

ITEMS = 48


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input states of DER and fine-tuning, after one update of 2 epochs each."""
    root = tmp_path_factory.mktemp("inputs")
    out = {}
    for method in ("der", "ft"):
        build_updater({"method": method, "items": ITEMS, "epochs": 2, "output": str(root / method)}).update(
            synthetic_data(10, ITEMS), task_id="t0"
        )
        out[method] = root / method
    return out


def _data(transform: Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]]) -> TensorDataset:
    x, y = synthetic_data(11, ITEMS).tensors
    return TensorDataset(*transform(x.clone(), y.clone()))


def _set_nan(x: torch.Tensor, y: torch.Tensor, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    x[5, 3] = value
    return x, y


def _nan_in_third_batch(D: type) -> Dataset:
    """A non-tensor dataset (items come through a DataLoader), whose third batch holds a NaN."""
    x, y = synthetic_data(11, ITEMS).tensors
    x = x.clone()
    x[40] = float("nan")
    return D(x, y)


DATA_CASES: dict[str, tuple[Callable[[type], Dataset], Any, str]] = {
    "empty dataset": (
        lambda D: TensorDataset(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long)), ValueError, "empty"
    ),
    "label above the classes": (
        lambda D: _data(lambda x, y: (x, y.fill_(4))),
        ValueError,
        r"labels must lie in \[0, 3\]",
    ),
    "negative label": (lambda D: _data(lambda x, y: (x, torch.where(y == 0, -1, y))), ValueError, r"labels must lie"),
    "float labels": (lambda D: _data(lambda x, y: (x, y.float())), ValueError, "1-D integer tensor"),
    "2-D labels": (lambda D: _data(lambda x, y: (x, y[:, None])), ValueError, "1-D integer tensor"),
    "wrong input shape": (lambda D: _data(lambda x, y: (x[:, :15], y)), ValueError, r"shape \(15,\).*do not fit"),
    "wrong input dtype": (lambda D: _data(lambda x, y: (x.double(), y)), ValueError, "torch.float64 do not fit"),
    # the train transform makes int64 inputs fit the model, but not the float32 rows of the memory:
    # refused before the first step
    "integer inputs": (lambda D: _data(lambda x, y: (x.long(), y)), ValueError,
                       r"torch\.int64 cannot join the memory, which holds .* torch\.float32"),
    "NaN input": (lambda D: _data(lambda x, y: _set_nan(x, y, float("nan"))), ValueError, "NaN or Inf"),
    "Inf input": (lambda D: _data(lambda x, y: _set_nan(x, y, float("inf"))), ValueError, "NaN or Inf"),
    # only the first batch of a non-tensor dataset is checked up front; a NaN further on stops training
    "NaN in a non-tensor dataset": (
        _nan_in_third_batch, (ValueError, NonFiniteLossError), "NaN or Inf|non-finite at step"
    ),
}


def _der(inp: Path, out: Path, **kw: Any) -> Any:
    options: dict[str, Any] = {"memory_size": 40, "accelerator": "cpu", **kw}
    return DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=16, num_outputs=4, hidden_sizes=(32,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        input_state_folder=inp,
        output_state_folder=out,
        **options,
    )


def _ft(inp: Path, out: Path, **kw: Any) -> Any:
    return FineTuningModelUpdater(
        MultiLayerPerceptron(num_inputs=16, num_outputs=4, hidden_sizes=(32,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        input_state_folder=inp,
        output_state_folder=out,
        accelerator="cpu",
        **kw,
    )


OPTION_CASES: dict[str, tuple[Callable[[Path, Path], Any], type[Exception], str]] = {
    "memory_size < 0": (lambda i, o: _der(i, o, memory_size=-1), ValueError, "memory_size"),
    "memory_size not the state's": (lambda i, o: _der(i, o, memory_size=41), StateError, "memory of size 40"),
    "batch_memory_frac = 1": (lambda i, o: _der(i, o, batch_memory_frac=1.0), ValueError, "batch_memory_frac"),
    "batch_memory_frac < 0": (lambda i, o: _der(i, o, batch_memory_frac=-0.1), ValueError, "batch_memory_frac"),
    "unknown strategy": (lambda i, o: _der(i, o, strategy="horovod"), ValueError, "strategy='horovod'"),
    "unknown precision": (lambda i, o: _der(i, o, precision="8-true"), ValueError, "precision='8-true'"),
    "unknown accelerator": (lambda i, o: _der(i, o, accelerator="tpu"), ValueError, "accelerator='tpu'"),
    "batch_size 0": (lambda i, o: _der(i, o, batch_size=0), ValueError, "batch_size"),
    "max_epochs 0": (lambda i, o: _der(i, o, max_epochs=0), ValueError, "max_epochs"),
    "negative checkpoint interval": (lambda i, o: _der(i, o, checkpoint_every_n_epochs=-1), ValueError, "checkpoint"),
    "misspelt option": (lambda i, o: _der(i, o, max_epoch=3), TypeError, "max_epoch"),
    "state of another method": (_ft, StateError, "written by DarkExperienceReplayModelUpdater"),
}


def _prepare(tmp_path: Path, states: dict[str, Path], method: str, existing_output: bool) -> tuple[Path, Path]:
    out = tmp_path / "out"
    if existing_output:
        shutil.copytree(states[method], out)
    return states[method], out


def _assert_nothing_changed(inp: Path, inp_before: dict[str, str], out: Path, out_before: dict[str, str]) -> None:
    assert snapshot(inp) == inp_before, "the input state changed"
    assert snapshot(out) == out_before, "the output folder changed"
    assert siblings(out) in ([], [f".{out.name}.lock"], sorted([out.name, f".{out.name}.lock"]), [out.name])


@pytest.mark.parametrize("existing_output", [False, True], ids=["no-output", "existing-output"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_fails_clearly_and_changes_nothing(
    case: str, existing_output: bool, states: dict[str, Path], tmp_path: Path, map_dataset: type
) -> None:
    make_data, error, message = DATA_CASES[case]
    inp, out = _prepare(tmp_path, states, "der", existing_output)
    inp_before, out_before = snapshot(inp), snapshot(out)
    updater = build_updater({"method": "der", "items": ITEMS, "epochs": 2, "input": str(inp), "output": str(out)})
    with pytest.raises(error, match=message):
        updater.update(make_data(map_dataset), task_id="t1")
    _assert_nothing_changed(inp, inp_before, out, out_before)


def test_non_finite_loss_names_the_step_and_writes_nothing(states: dict[str, Path], tmp_path: Path) -> None:
    """The loss turns NaN at the 7th step of this update; steps count over all updates."""
    inp, out = _prepare(tmp_path, states, "ft", existing_output=False)
    inp_before = snapshot(inp)
    calls = 0

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
        return loss * float("nan") if calls == 7 else loss

    updater = build_updater({"method": "ft", "items": ITEMS, "epochs": 3, "input": str(inp), "output": str(out)})
    updater.learner.loss_fn = loss_fn
    first_step = updater.learner.global_step
    assert first_step > 0
    with pytest.raises(NonFiniteLossError, match=rf"non-finite at step {first_step + 6} "):
        updater.update(synthetic_data(11, ITEMS), task_id="t1")
    _assert_nothing_changed(inp, inp_before, out, {})


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_invalid_options_fail_before_anything_is_written(case: str, states: dict[str, Path], tmp_path: Path) -> None:
    build, error, message = OPTION_CASES[case]
    inp, out = _prepare(tmp_path, states, "der", existing_output=True)
    inp_before, out_before = snapshot(inp), snapshot(out)
    with pytest.raises(error, match=message):
        build(inp, out)
    _assert_nothing_changed(inp, inp_before, out, out_before)
