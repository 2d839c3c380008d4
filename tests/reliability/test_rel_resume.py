"""Resume within a long update: with ``checkpoint_every_n_epochs`` an update that dies continues
from its last checkpointed epoch and ends with exactly the bytes of an uninterrupted run (CPU,
fixed seed). A fresh start would give the same bytes too, so every test also checks that the
update really resumed (start epoch, steps trained), and one test shows that leaving out a piece
of the checkpoint (the optimizer state) changes the result."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rel_support import JobRun, build_updater, fork_server, siblings, snapshot, synthetic_data

from retain import MultiLayerPerceptron
from retain.checkpoint import ResumeCheckpointer, flatten_tree, resume_folder, unflatten_tree
from retain.methods import RepeatedDistillationModelUpdater
from retain.state import StateError

ITEMS, BATCH_NEW = 64, 8  # DER-family: batch 16 = 8 new + 8 memory items


class _CrashError(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def _job(tmp_path: Path, method: str, output: str, **kw: Any) -> dict[str, Any]:
    return {"method": method, "items": ITEMS, "input": str(tmp_path / "input"), "output": str(tmp_path / output), **kw}


def _update(job: dict[str, Any], data_seed: int = 11, val: bool = False) -> Any:
    updater = build_updater(job)
    updater.update(
        synthetic_data(data_seed, ITEMS), val_dataset=synthetic_data(12, ITEMS) if val else None, task_id="t1"
    )
    return updater


def _crash_after_epoch(monkeypatch: pytest.MonkeyPatch, crash_epoch: int) -> None:
    original = ResumeCheckpointer.on_epoch_end

    def on_epoch_end(self: ResumeCheckpointer, epoch: int, result: Any) -> None:
        original(self, epoch, result)
        if epoch == crash_epoch:
            raise _CrashError(f"crashed after epoch {epoch}")

    monkeypatch.setattr(ResumeCheckpointer, "on_epoch_end", on_epoch_end)


def _steps_per_epoch(method: str) -> int:
    return ITEMS // (16 if method in ("ft", "joint") else BATCH_NEW) * (2 if method == "joint" else 1)


def _input_state(tmp_path: Path, method: str) -> None:
    _update({"method": method, "items": ITEMS, "output": str(tmp_path / "input"), "epochs": 2}, data_seed=10)


@pytest.mark.parametrize(
    ("method", "every", "crash_epoch", "resumed_from"),
    [("ft", 1, 2, 3), ("joint", 1, 2, 3), ("der", 2, 2, 2), ("super", 1, 3, 4)],
)
def test_killed_update_resumes_and_ends_bit_identical(
    method: str, every: int, crash_epoch: int, resumed_from: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = 6
    _input_state(tmp_path, method)
    _update(_job(tmp_path, method, "reference", epochs=epochs, checkpoint_every=every))
    with monkeypatch.context() as m:
        _crash_after_epoch(m, crash_epoch)
        with pytest.raises(_CrashError, match="crashed after epoch"):
            _update(_job(tmp_path, method, "out", epochs=epochs, checkpoint_every=every))
    out = tmp_path / "out"
    assert not out.exists() and resume_folder(out).is_dir()
    updater = _update(_job(tmp_path, method, "out", epochs=epochs, checkpoint_every=every))
    assert updater.resumed_from_epoch == resumed_from
    assert updater.last_fit.steps == (epochs - resumed_from) * _steps_per_epoch(method)
    assert len(updater.last_fit.history) == epochs
    assert snapshot(out) == snapshot(tmp_path / "reference")
    assert siblings(out) == ["out"], "the resume checkpoint was not removed"


def test_sigkilled_update_process_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    server = fork_server()
    epochs = 8
    _input_state(tmp_path, "super")
    job = _job(tmp_path, "super", "out", epochs=epochs, checkpoint_every=1)

    def finish(run: JobRun) -> None:
        assert run.wait() == 0, server.stderr_tail()

    finish(server.run(**{**job, "output": str(tmp_path / "reference")}))
    run = server.run(**job)
    assert run.wait_for(lambda e: e["event"] == "epoch_end" and e["epoch"] == 3), server.stderr_tail()
    assert run.kill() == -9
    assert not run.finished and not (tmp_path / "out").exists()
    resumed = server.run(**job)
    finish(resumed)
    start = resumed.markers("fit")[0]["start_epoch"]
    assert 4 <= start < epochs, "the update started over instead of resuming"
    done = resumed.markers("done")[0]
    assert done["resumed_from_epoch"] == start
    assert len(resumed.markers("epoch_end")) == epochs - start
    assert done["steps"] == (epochs - start) * _steps_per_epoch("super")
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")
    assert siblings(tmp_path / "out") == ["out"]


def test_resume_continues_early_stopping_from_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update is resumed right before the epoch that stops it (the first one not improving
    val_accuracy, patience 1): it must stop there too, which needs the best value and weights of the
    epochs before (the best weights travel in the checkpoint)."""
    options = {"metric": "val_accuracy", "mode": "max", "early_stopping_enabled": True, "patience": 1}
    _input_state(tmp_path, "der")
    kw: dict[str, Any] = {"epochs": 12, "checkpoint_every": 1, "options": options}
    reference = _update(_job(tmp_path, "der", "reference", **kw), val=True)
    stop = reference.last_fit.epochs
    assert reference.last_fit.stopped_early and 3 <= stop < 12
    with monkeypatch.context() as m:
        _crash_after_epoch(m, stop - 2)
        with pytest.raises(_CrashError, match="crashed after epoch"):
            _update(_job(tmp_path, "der", "out", **kw), val=True)
    updater = _update(_job(tmp_path, "der", "out", **kw), val=True)
    assert updater.resumed_from_epoch == stop - 1
    assert updater.last_fit.stopped_early and updater.last_fit.epochs == stop and updater.last_fit.steps == 8
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")


def test_resume_without_the_optimizer_state_would_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bit-for-bit comparison is sensitive: dropping Adam's moments on resume changes the result."""
    _input_state(tmp_path, "der")
    _update(_job(tmp_path, "der", "reference", epochs=5, checkpoint_every=1))
    with monkeypatch.context() as m:
        _crash_after_epoch(m, 1)
        with pytest.raises(_CrashError, match="crashed after epoch"):
            _update(_job(tmp_path, "der", "out", epochs=5, checkpoint_every=1))
    restore = ResumeCheckpointer.restore

    def restore_without_optimizer(self: ResumeCheckpointer) -> dict[str, Any]:
        kwargs = restore(self)
        kwargs.pop("optimizer_state")
        return kwargs

    monkeypatch.setattr(ResumeCheckpointer, "restore", restore_without_optimizer)
    assert _update(_job(tmp_path, "der", "out", epochs=5, checkpoint_every=1)).resumed_from_epoch == 2
    ref, out = snapshot(tmp_path / "reference"), snapshot(tmp_path / "out")
    assert ref["model.safetensors"] != out["model.safetensors"]


@pytest.mark.parametrize("change", ["other data", "other seed", "corrupt checkpoint"])
def test_a_checkpoint_of_another_update_or_a_corrupt_one_is_ignored(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _input_state(tmp_path, "der")
    kw: dict[str, Any] = {"epochs": 4, "checkpoint_every": 1}
    with monkeypatch.context() as m:
        _crash_after_epoch(m, 1)
        with pytest.raises(_CrashError, match="crashed after epoch"):
            _update(_job(tmp_path, "der", "out", **kw))
    data_seed = 11
    if change == "other data":
        data_seed = 13
    elif change == "other seed":
        kw["seed"] = 4
    else:
        path = resume_folder(tmp_path / "out") / "optimizer.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    _update(_job(tmp_path, "der", "reference", **kw), data_seed=data_seed)
    message = "unreadable resume checkpoint" if change == "corrupt checkpoint" else "belongs to a different update"
    with pytest.warns(UserWarning, match=message):
        updater = _update(_job(tmp_path, "der", "out", **kw), data_seed=data_seed)
    assert updater.resumed_from_epoch == 0
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")
    assert siblings(tmp_path / "out") == ["out"]


def test_no_checkpoint_is_left_without_checkpointing(tmp_path: Path) -> None:
    _input_state(tmp_path, "der")
    _update(_job(tmp_path, "der", "out", epochs=3))
    assert siblings(tmp_path / "out") == ["out"]


def test_checkpointing_options_are_checked_before_training(tmp_path: Path) -> None:
    model = MultiLayerPerceptron(num_inputs=16, num_outputs=4, hidden_sizes=(32,))
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs an output_state_folder"):
        build_updater({"checkpoint_every": 1, "output": None})
    with pytest.raises(ValueError, match="does not support checkpoint_every_n_epochs"):
        RepeatedDistillationModelUpdater(
            model, optimizer=optimizer, output_state_folder=tmp_path / "rd", checkpoint_every_n_epochs=1
        )
    assert os.listdir(tmp_path) == []


def test_optimizer_and_scheduler_state_round_trip_without_pickle() -> None:
    """Adam's state (int keys, tuple betas, tensor steps) and a scheduler's survive exactly."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    data, tensors = flatten_tree(state)
    restored = unflatten_tree(data, tensors)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(restored["optimizer"]["state"]) == {0, 1}
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(restored["optimizer"]["state"][0][key], value)
    assert restored["scheduler"] == state["scheduler"]
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(restored["optimizer"])
    assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    with pytest.raises(TypeError, match="without pickle"):
        flatten_tree({"fn": shutil.rmtree})
    with pytest.raises(StateError, match="unreferenced tensors"):
        unflatten_tree(data, {**tensors, "extra": torch.zeros(1)})


def test_dict_keys_of_a_checkpoint_are_scalars_none_included() -> None:
    """A None key (as in some schedulers' states) survives; a key that decodes to a list or a
    tuple (a hand-edited checkpoint) is refused, since a dict cannot hold it."""
    data, tensors = flatten_tree({None: 1, 2: "b", "c": 3.5})
    assert unflatten_tree(data, tensors) == {None: 1, 2: "b", "c": 3.5}
    for key in ([1, 2], {"__tuple__": [1]}):
        with pytest.raises(StateError, match=r"^checkpoint: invalid dict key"):
            unflatten_tree({"__dict__": [[key, 1]]}, {})
