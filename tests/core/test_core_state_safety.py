"""State folders: atomic writes (simulated crashes), locking, and refusal of corrupt, hostile or
mismatched folders (without ever unpickling)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import retain.state
from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    ModelUpdater,
    MultiLayerPerceptron,
    StateError,
    StateLockedError,
    load_model,
)
from retain.state import StateFolder, lock_output_folder

OPTIONS: dict[str, Any] = {"batch_size": 32, "max_epochs": 1, "seed": 0, "accelerator": "cpu"}


def _updater(cls: type[ModelUpdater], hidden: int = 16, **kwargs: Any) -> ModelUpdater:
    torch.manual_seed(0)
    return cls(
        MultiLayerPerceptron(64, 10, [hidden]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        **OPTIONS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def train_sets(digits_tasks) -> tuple[TensorDataset, TensorDataset]:
    return digits_tasks[0][0], digits_tasks[1][0]


@pytest.fixture(scope="module")
def er_state(tmp_path_factory: pytest.TempPathFactory, train_sets) -> Path:
    """A pristine ER state folder after one update (copy it before editing)."""
    folder = tmp_path_factory.mktemp("er") / "state"
    _updater(ExperienceReplayModelUpdater, memory_size=30, output_state_folder=folder).update(train_sets[0])
    return folder


@pytest.fixture
def state_copy(er_state: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(er_state, copy)
    return copy


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    """Entries beside ``name`` other than the lock file: temporaries a failed write left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name not in (name, f".{name}.lock"))


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replaces ``name`` and updates its manifest entry, so only a content check can catch it."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------ atomicity
def _crash_after(monkeypatch: pytest.MonkeyPatch, files_written: int) -> None:
    real = retain.state.write_file
    calls = {"n": 0}

    def write_file(path: Path, chunks):
        if calls["n"] == files_written:
            raise OSError("simulated crash while writing the state")
        calls["n"] += 1
        return real(path, chunks)

    monkeypatch.setattr(retain.state, "write_file", write_file)


@pytest.mark.parametrize("existed", [False, True])
def test_crash_while_writing_leaves_no_partial_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, train_sets, existed: bool
) -> None:
    out = tmp_path / "out"
    updater = _updater(FineTuningModelUpdater, output_state_folder=out)
    before: dict[str, bytes] = {}
    if existed:
        updater.update(train_sets[0])
        before = _files(out)
    with monkeypatch.context() as m:
        _crash_after(m, files_written=2)
        with pytest.raises(OSError, match="simulated crash"):
            updater.update(train_sets[1])
    if existed:
        assert _files(out) == before  # still the previous complete state
        StateFolder(out)
    else:
        assert not out.exists()
    assert _leftovers(tmp_path, "out") == []  # no temporary folder that could be mistaken for a state
    updater.update(train_sets[1])  # a later write succeeds
    assert StateFolder(out).manifest["updates_done"] == (3 if existed else 2)


@pytest.mark.parametrize("existed", [False, True])
def test_failed_rename_keeps_the_previous_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, er_state: Path, existed: bool
) -> None:
    out = tmp_path / "out"
    if existed:
        shutil.copytree(er_state, out)
    before = _files(out) if existed else {}
    updater = _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=er_state)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if ".tmp-" in Path(src).name:
            raise OSError("simulated rename failure")
        return real_rename(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", rename)
        with pytest.raises(OSError, match="simulated rename failure"):
            updater.save_state(out)
    if existed:
        assert _files(out) == before
    else:
        assert not out.exists()
    assert _leftovers(tmp_path, "out") == []
    updater.save_state(out)
    assert StateFolder(out).manifest["method"] == "ExperienceReplayModelUpdater"


def test_folder_without_manifest_is_refused(state_copy: Path) -> None:
    (state_copy / "manifest.json").unlink()
    with pytest.raises(StateError, match=r"manifest\.json"):
        StateFolder(state_copy)


def test_stale_temporaries_are_cleaned_under_the_lock(tmp_path: Path, er_state: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-4242-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    # a writer killed between its two renames: the previous state sits in .out.old-*, no out/
    shutil.copytree(er_state, tmp_path / ".out.old-4242-cafe0000")
    unrelated = tmp_path / ".other.tmp-1-00000000"
    unrelated.mkdir()
    with lock_output_folder(out):
        assert not stale.exists()
        assert _files(out) == _files(er_state)  # the last complete state is back in place
        assert _leftovers(tmp_path, "out") == [".other.tmp-1-00000000"]  # other folders' files untouched
    # with a complete out/ present, a stale .old-* is just removed
    shutil.copytree(er_state, tmp_path / ".out.old-1-00000000")
    with lock_output_folder(out):
        assert not (tmp_path / ".out.old-1-00000000").exists()
    assert _files(out) == _files(er_state)


def test_second_writer_is_locked_out(tmp_path: Path, train_sets) -> None:
    out = tmp_path / "out"
    with lock_output_folder(out):
        with pytest.raises(StateLockedError, match="another update"), lock_output_folder(out):
            pass
        with pytest.raises(StateLockedError, match="another update is writing the state folder"):
            _updater(FineTuningModelUpdater, output_state_folder=out)  # refused when built, before reading
        assert not out.exists()
    with lock_output_folder(out):  # released: a new writer gets it
        pass


# ------------------------------------------------------------------------------------------ refusals
class _Exploit:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_without_running_it(state_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    _rewrite(state_copy, "model.safetensors", payload)
    StateFolder(state_copy)  # checksums match: only the format check can refuse it
    with pytest.raises(StateError, match=r"model\.safetensors"):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=state_copy)
    with pytest.raises(StateError, match=r"model\.safetensors"):
        load_model(state_copy)
    assert not marker.exists()
    # the payload is live: unpickling it would have created the marker
    pickle.loads(payload).close()
    assert marker.exists()


def test_torch_save_payload_is_refused(state_copy: Path, tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"layers.0.weight": torch.zeros(1)}, buffer)
    _rewrite(state_copy, "memory.safetensors", buffer.getvalue())
    with pytest.raises(StateError, match=r"memory\.safetensors"):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=state_copy)


def test_bit_flip_is_refused_naming_the_file(state_copy: Path) -> None:
    path = state_copy / "memory.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=r"memory\.safetensors.*checksum"):
        StateFolder(state_copy)


def test_newer_format_version_asks_for_an_upgrade(state_copy: Path) -> None:
    _edit_manifest(state_copy, lambda m: m.update(format_version=m["format_version"] + 1))
    with pytest.raises(StateError, match="upgrade"):
        StateFolder(state_copy)


@pytest.mark.parametrize("bad_name", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "model.pkl"])
def test_file_names_outside_the_folder_are_refused(state_copy: Path, bad_name: str) -> None:
    def edit(manifest: dict) -> None:
        manifest["files"][bad_name] = manifest["files"].pop("model.safetensors")

    _edit_manifest(state_copy, edit)
    with pytest.raises(StateError, match="file name"):
        StateFolder(state_copy)


def test_unexpected_extra_file_is_refused(state_copy: Path) -> None:
    (state_copy / "extra.json").write_text("{}")
    with pytest.raises(StateError, match=r"extra\.json"):
        StateFolder(state_copy)


def test_missing_listed_file_is_refused(state_copy: Path) -> None:
    (state_copy / "learner.json").unlink()
    with pytest.raises(StateError, match=r"learner\.json"):
        StateFolder(state_copy)


def test_symlinked_file_is_refused(state_copy: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.safetensors"
    (state_copy / "model.safetensors").rename(target)
    (state_copy / "model.safetensors").symlink_to(target)
    with pytest.raises(StateError, match="regular file"):
        StateFolder(state_copy)


def test_folder_of_another_method_is_refused_naming_both(er_state: Path) -> None:
    with pytest.raises(StateError, match="ExperienceReplayModelUpdater") as info:
        _updater(DarkExperienceReplayModelUpdater, memory_size=30, input_state_folder=er_state)
    assert "DarkExperienceReplayModelUpdater" in str(info.value)
    assert "was written by ExperienceReplayModelUpdater" in str(info.value)


def test_folder_of_another_model_shape_is_refused(er_state: Path) -> None:
    with pytest.raises(StateError, match="hyperparameters"):
        _updater(ExperienceReplayModelUpdater, hidden=17, memory_size=30, input_state_folder=er_state)


def test_memory_of_another_size_is_refused(er_state: Path) -> None:
    with pytest.raises(StateError, match="memory"):
        _updater(ExperienceReplayModelUpdater, memory_size=31, input_state_folder=er_state)


def test_pristine_folder_loads(er_state: Path) -> None:
    """The control for the refusals above: the unedited folder is accepted."""
    updater = _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=er_state)
    assert updater.learner.updates_done == 1 and len(updater.learner.memory) == 30
    assert load_model(er_state).describe() == updater.model.describe()
