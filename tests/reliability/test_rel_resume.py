"""Resume within a long update: with ``checkpoint_every_n_epochs`` an update that dies continues
from its last checkpointed epoch and ends with exactly the bytes of an uninterrupted run (CPU,
fixed seed). A fresh start would give the same bytes too, so every test also checks that the
update really resumed (start epoch, steps trained), and one test shows that leaving out a piece
of the checkpoint (the optimizer state) changes the result. The later tests pin when checkpoints
are written, how a checkpoint edited by hand is ignored or refused, the random generator states
and the pickle-free flattening of optimizer states."""

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
from state_edits import rewrite_state

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


# ------------------------------------------------------------------ when checkpoints are written
def _record_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The resume.json of every checkpoint written (the checkpointer's write_state spied on)."""
    import retain.checkpoint as checkpoint

    written: list[dict[str, Any]] = []
    real = checkpoint.write_state

    def spy(folder: Any, manifest: Any, json_files: dict[str, Any], tensor_files: Any) -> Any:
        written.append(json_files["resume.json"])
        return real(folder, manifest, json_files, tensor_files)

    monkeypatch.setattr(checkpoint, "write_state", spy)
    return written


@pytest.mark.parametrize(("epochs", "every", "expected"), [(5, 2, [2, 4]), (3, 1, [1, 2]), (4, 4, []), (7, 3, [3, 6])])
def test_checkpoints_are_written_every_n_epochs_but_not_after_the_last(
    epochs: int, every: int, expected: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _record_checkpoints(monkeypatch)
    updater = _update({"method": "ft", "items": 32, "output": str(tmp_path / "out"), "epochs": epochs,
                       "checkpoint_every": every})  # fmt: skip
    assert [w["epochs_done"] for w in written] == expected
    for w in written:  # each holds the fingerprint and the history of the epochs done
        assert w["format_version"] == 1 and len(w["history"]) == w["epochs_done"]
        assert w["fingerprint"] == written[0]["fingerprint"] and len(w["fingerprint"]) == 64
    history = [{k: v for k, v in e.items()} for e in updater.last_fit.history]
    assert [unflatten_tree(w["history"], {}) for w in written] == [history[: w["epochs_done"]] for w in written]
    assert siblings(tmp_path / "out") == ["out"]


def test_no_checkpoint_is_written_after_the_epoch_that_stops_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"metric": "val_accuracy", "mode": "max", "early_stopping_enabled": True, "patience": 1}
    written = _record_checkpoints(monkeypatch)
    updater = _update(_job(tmp_path, "der", "out", epochs=12, checkpoint_every=1, options=options, input=None),
                      val=True)  # fmt: skip
    stop = updater.last_fit.epochs
    assert updater.last_fit.stopped_early and stop < 12
    assert [w["epochs_done"] for w in written] == list(range(1, stop))


# ------------------------------------------------------------------ a checkpoint edited by hand
def _checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Path]:
    """A fine-tuning update of 3 epochs killed after its first checkpoint (epoch 1): (job, checkpoint)."""
    job = {"method": "ft", "items": 32, "output": str(tmp_path / "out"), "epochs": 3, "checkpoint_every": 1}
    with monkeypatch.context() as m:
        _crash_after_epoch(m, 0)
        with pytest.raises(_CrashError, match="crashed after epoch 0"):
            _update(job)
    return job, resume_folder(tmp_path / "out")


def test_an_unedited_checkpoint_resumes_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rewritten (still valid) checkpoint resumes, with a log line; a temporary left by a killed
    writer or remover of the checkpoint is deleted first."""
    import logging

    job, folder = _checkpoint(tmp_path, monkeypatch)
    rewrite_state(folder)
    stale = tmp_path / f".{folder.name}.tmp-12345-0123abcd"
    stale.mkdir()
    (stale / "x").write_text("left by a killed writer")
    with caplog.at_level(logging.INFO, logger="retain"):
        assert _update(job).resumed_from_epoch == 1
    assert f"resuming the update from its checkpoint after epoch 1 ({folder})" in caplog.text
    assert not stale.exists() and siblings(tmp_path / "out") == ["out"]


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        (lambda r: {**r, "extra": 1}, "unreadable resume checkpoint.*keys must be format_version"),
        (lambda r: [r], "unreadable resume checkpoint.*keys must be format_version"),
        (lambda r: {k: v for k, v in r.items() if k != "history"}, "unreadable resume checkpoint"),
        (lambda r: {**r, "format_version": 2}, "belongs to a different update"),
        (lambda r: {**r, "fingerprint": "0" * 64}, "belongs to a different update"),
    ],
)
def test_a_checkpoint_of_another_format_or_update_is_ignored_with_a_warning(
    resume: Any, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, folder = _checkpoint(tmp_path, monkeypatch)
    rewrite_state(folder, resume_json=resume)
    restore = ResumeCheckpointer.restore
    left: list[bool] = []

    def restore_then_look(self: ResumeCheckpointer) -> dict[str, Any]:
        kwargs = restore(self)
        left.append(self.folder.exists())
        return kwargs

    monkeypatch.setattr(ResumeCheckpointer, "restore", restore_then_look)
    with pytest.warns(UserWarning, match=message):
        updater = _update(job)
    assert left == [False], "the ignored checkpoint was not removed before training"
    assert updater.resumed_from_epoch == 0 and updater.last_fit.epochs == 3
    assert siblings(tmp_path / "out") == ["out"]


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"resume_json": lambda r: {**r, "epochs_done": 0}}, "epochs_done must be a positive integer, got 0"),
        ({"resume_json": lambda r: {**r, "epochs_done": True}}, "epochs_done must be a positive integer, got True"),
        ({"resume_json": lambda r: {**r, "epochs_done": "1"}}, "epochs_done must be a positive integer, got '1'"),
        ({"resume_json": lambda r: {**r, "history": []}}, "history must list the 1 epochs done"),
        ({"resume_json": lambda r: {**r, "history": {"__tuple__": [{"__dict__": []}]}}},
         "history must list the 1 epochs done"),
        ({"resume_json": lambda r: {**r, "history": [{"__dict__": []}] * 2}}, "history must list the 1 epochs done"),
        ({"optimizer_json": lambda o: {"__dict__": [x for x in o["__dict__"] if x[0] != "scheduler"]}},
         "optimizer.json: must hold the optimizer and scheduler states"),
        ({"optimizer_json": lambda o: [o]}, "optimizer.json: must hold the optimizer and scheduler states"),
        ({"rng_json": lambda r: [r]}, r"rng.json: must be a JSON object"),
        ({"rng_json": lambda r: {k: v for k, v in r.items() if k != "numpy"}},
         r"rng.json: invalid random generator state: KeyError\('numpy'\)"),
    ],
)  # fmt: skip
def test_a_matching_checkpoint_edited_by_hand_is_refused_naming_the_file(
    edits: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, folder = _checkpoint(tmp_path, monkeypatch)
    rewrite_state(folder, **edits)
    with pytest.raises(StateError, match=message) as raised:
        _update(job)
    if "resume_json" not in edits:
        assert str(raised.value).endswith(f"(delete the resume checkpoint {folder} to start the update over)")
    assert folder.is_dir() and not (tmp_path / "out").exists()


def test_the_global_random_generators_round_trip() -> None:
    """torch, NumPy (its cached Gaussian too) and ``random`` continue with the same draws after a restore."""
    import random

    import numpy as np

    from retain.checkpoint import global_rng_state, set_global_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # one of a pair: the second is cached (has_gauss=1)
    random.gauss(0.0, 1.0)  # likewise gauss_next
    meta, tensors = global_rng_state()
    assert tensors["numpy_keys"].dtype == torch.int64  # safetensors-friendly, read back as uint32
    assert meta["numpy"]["has_gauss"] == 1 and meta["python"]["gauss_next"] is not None
    assert meta["cuda_devices"] == (torch.cuda.device_count() if torch.cuda.is_initialized() else 0)

    def draws() -> tuple[Any, ...]:
        return (torch.rand(3).tolist(), np.random.standard_normal(), np.random.rand(2).tolist(),
                random.gauss(0.0, 1.0), random.random())  # fmt: skip

    first = draws()
    set_global_rng_state(meta, tensors, "here")
    assert draws() == first
    with pytest.raises(StateError, match=r"^here: invalid random generator state: KeyError\('numpy_keys'\)"):
        set_global_rng_state(meta, {"torch_cpu": tensors["torch_cpu"]}, "here")


def test_flattening_keeps_what_json_cannot_hold() -> None:
    """Non-finite floats, tuples, int keys survive; tensors are copied (a later in-place step does not
    change the checkpoint) and referenced by name; values and keys without a JSON form are refused."""
    import math

    t = torch.arange(3.0)
    data, tensors = flatten_tree({"a": (math.inf, -math.inf, math.nan, 1.5), 1: [t, True, None, 7]})
    t += 10
    assert data == {"__dict__": [
        ["a", {"__tuple__": [{"__float__": "inf"}, {"__float__": "-inf"}, {"__float__": "nan"}, 1.5]}],
        [1, [{"__tensor__": "t0"}, True, None, 7]],
    ]}  # fmt: skip
    assert list(tensors) == ["t0"] and tensors["t0"].tolist() == [0.0, 1.0, 2.0]
    back = unflatten_tree(data, tensors)
    inf, minus_inf, nan, x = back["a"]
    assert (inf, minus_inf, x) == (math.inf, -math.inf, 1.5) and math.isnan(nan)
    assert back[1][1:] == [True, None, 7] and back[1][0] is tensors["t0"]
    assert flatten_tree([torch.zeros(2, 2).t(), torch.ones(1)])[1]["t1"].tolist() == [1.0]
    assert flatten_tree([torch.zeros(4, 2).t()])[1]["t0"].is_contiguous()
    with pytest.raises(TypeError, match="cannot store a dict key of type tuple without pickle"):
        flatten_tree({(1, 2): 3})
    with pytest.raises(TypeError, match="cannot store a value of type set in a checkpoint without pickle"):
        flatten_tree([{1}])


@pytest.mark.parametrize(
    ("data", "tensors", "message"),
    [
        ({"a": 1}, {}, "unexpected JSON object"),
        ({"__tuple__": [], "__dict__": []}, {}, "unexpected JSON object"),
        ({"__tensor__": "t9"}, {}, "reference to a missing tensor 't9'"),
        ({"__tensor__": 3}, {}, "reference to a missing tensor 3"),
        ([{"__tensor__": "t0"}, {"__tensor__": "t0"}], {"t0": torch.zeros(1)}, "tensor 't0' is referenced twice"),
        ({"__float__": "1e400"}, {}, "invalid float '1e400'"),
        ({"__tuple__": "ab"}, {}, "__tuple__ must hold a list"),
        ({"__dict__": [[1, 2, 3]]}, {}, "a dict entry must be a \\[key, value\\] pair"),
        ({"__dict__": ["ab"]}, {}, "a dict entry must be a \\[key, value\\] pair"),
        ({"__dict__": [[1, 2], [1, 3]]}, {}, "duplicate dict key 1"),
        ([], {"t0": torch.zeros(1)}, r"unreferenced tensors \['t0'\]"),
    ],
)
def test_a_malformed_flattened_value_is_refused_naming_where(data: Any, tensors: Any, message: str) -> None:
    with pytest.raises(StateError, match=f"^optimizer.json: {message}"):
        unflatten_tree(data, tensors, "optimizer.json")


def test_cuda_generator_states_are_saved_per_device_and_restored_on_the_same_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With CUDA in use every device's generator is saved; a restore needs the same number of
    devices, and a checkpoint saved without CUDA restores on a CUDA machine without touching it
    (torch.cuda is stubbed: this runs on CPU)."""
    from retain.checkpoint import global_rng_state, set_global_rng_state

    restored: list[list[torch.Tensor]] = []
    states = [torch.full((4,), 1, dtype=torch.uint8), torch.full((4,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    meta, tensors = global_rng_state()
    assert meta["cuda_devices"] == 0 and not any(k.startswith("torch_cuda") for k in tensors), "CUDA not available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    set_global_rng_state(meta, tensors, "here")
    assert restored == [], "a checkpoint without CUDA states touched CUDA"
    cuda_meta, cuda_tensors = global_rng_state()
    assert cuda_meta["cuda_devices"] == 2
    assert [cuda_tensors[f"torch_cuda_{i}"].tolist() for i in (0, 1)] == [[1] * 4, [2] * 4]
    set_global_rng_state(cuda_meta, cuda_tensors, "here")
    assert [[t.tolist() for t in call] for call in restored] == [[[1] * 4, [2] * 4]]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StateError, match=r"^here: invalid random generator state: ValueError\('saved on 2 CUDA "
                                         r"devices, 1 now'\)"):  # fmt: skip
        set_global_rng_state(cuda_meta, cuda_tensors, "here")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert global_rng_state()[0]["cuda_devices"] == 0, "CUDA not started: no device state to save"
