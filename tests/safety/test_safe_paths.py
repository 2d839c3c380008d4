"""A state path that is not a state folder never costs the user a file (issue: safe output paths).

Each test asserts what a user would check: their files still there byte for byte, the input state
byte-identical (hash before/after), the one-line error text, and nothing half-written."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    ModelUpdater,
    MultiLayerPerceptron,
    StateError,
    StateLockedError,
)
from retain.state import OutputLock, StateFolder, remove_stale_temporaries, write_state

REPO = Path(__file__).resolve().parents[2]
OPTIONS: dict[str, Any] = {"batch_size": 32, "max_epochs": 1, "seed": 0, "accelerator": "cpu"}


def _updater(cls: type[ModelUpdater] = FineTuningModelUpdater, **kwargs: Any) -> ModelUpdater:
    torch.manual_seed(0)
    return cls(MultiLayerPerceptron(64, 10, [16]), optimizer=functools.partial(torch.optim.SGD, lr=0.05),
               **OPTIONS, **kwargs)  # fmt: skip


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the names of folders and links): what a user has."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link->" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def chunk(digits_tasks) -> TensorDataset:
    return digits_tasks[0][0]


@pytest.fixture(scope="module")
def pristine_state(tmp_path_factory: pytest.TempPathFactory, chunk) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "v1"
    _updater(ExperienceReplayModelUpdater, memory_size=30, output_state_folder=folder).update(chunk)
    return folder


@pytest.fixture
def user_dir(tmp_path: Path, pristine_state: Path) -> Path:
    """A user's working folder: a config, notes, and runs/ holding two states."""
    import shutil

    (tmp_path / "cfg.py").write_text("METHOD = 'er'\n")
    (tmp_path / "notes.txt").write_text("do not lose me\n")
    shutil.copytree(pristine_state, tmp_path / "runs" / "v1")
    shutil.copytree(pristine_state, tmp_path / "runs" / "v2")
    return tmp_path


# ------------------------------------------------------------------------- finding 1: output deletes
@pytest.mark.parametrize(
    "output, reason",
    [
        (".", "contains the input state folder"),
        ("runs", "not a retain state folder"),
        ("notes.txt", "it is a file, not a state folder"),
    ],
)
def test_output_that_is_not_a_state_folder_is_refused_and_kept(
    user_dir: Path, chunk, monkeypatch: pytest.MonkeyPatch, output: str, reason: str
) -> None:
    monkeypatch.chdir(user_dir)
    before = tree_digest(user_dir)
    with pytest.raises(StateError, match=reason):
        _updater(ExperienceReplayModelUpdater, memory_size=30, output_state_folder=output,
                 input_state_folder="runs/v1" if output == "." else None)  # fmt: skip
    assert tree_digest(user_dir) == before  # nothing deleted, hidden or added


def test_output_that_is_the_inputs_parent_is_refused(user_dir: Path) -> None:
    before = tree_digest(user_dir)
    with pytest.raises(StateError, match="contains the input state folder"):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=user_dir / "runs" / "v1",
                 output_state_folder=user_dir / "runs")  # fmt: skip
    assert tree_digest(user_dir) == before


def test_folder_of_user_files_and_a_state_folder_with_extra_files_are_refused(user_dir: Path, chunk) -> None:
    (user_dir / "photos").mkdir()
    (user_dir / "photos" / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    (user_dir / "runs" / "v2" / "my_notes.txt").write_text("mine")
    before = tree_digest(user_dir)
    with pytest.raises(StateError, match="not a retain state folder"):
        _updater(output_state_folder=user_dir / "photos")
    with pytest.raises(StateError, match=r"holds files that are not part of its state: \['my_notes.txt'\]"):
        _updater(output_state_folder=user_dir / "runs" / "v2")
    assert tree_digest(user_dir) == before


def test_an_existing_state_folder_is_replaced_atomically(user_dir: Path, chunk) -> None:
    out = user_dir / "runs" / "v2"
    _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=user_dir / "runs" / "v1",
             output_state_folder=out).update(chunk)  # fmt: skip
    assert StateFolder(out).manifest["updates_done"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["v1", "v2"]  # no lock, no .old-, no .tmp-


def test_cli_update_into_the_working_directory_refuses_and_keeps_every_file(user_dir: Path) -> None:
    config = REPO / "examples" / "digits_config.py"
    before = tree_digest(user_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "retain.cli", "update", "--config", str(config), "--output-state", "."],
        cwd=user_dir, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "it is not a retain state folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(user_dir) == before


# ------------------------------------------------------------------- finding 2: the input is kept
@pytest.mark.parametrize("relation", ["same", "inside"])
def test_output_equal_to_or_inside_the_input_is_refused(user_dir: Path, relation: str) -> None:
    inp = user_dir / "runs" / "v1"
    out = inp if relation == "same" else inp / "next"
    before = tree_digest(user_dir)
    match = "is the input state folder" if relation == "same" else "is inside the input state folder"
    with pytest.raises(StateError, match=match):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=inp, output_state_folder=out)
    assert tree_digest(user_dir) == before
    StateFolder(inp)  # still a valid state


def test_input_through_a_symlinked_parent_is_still_recognised(user_dir: Path) -> None:
    (user_dir / "alias").symlink_to(user_dir / "runs")
    with pytest.raises(StateError, match="is the input state folder"):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=user_dir / "alias" / "v1",
                 output_state_folder=user_dir / "runs" / "v1")  # fmt: skip


def test_two_writers_of_one_folder_cannot_both_proceed_from_the_same_input(user_dir: Path, chunk) -> None:
    inp, out = user_dir / "runs" / "v1", user_dir / "out"
    first = _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=inp, output_state_folder=out)
    with pytest.raises(StateLockedError, match="another update is writing the state folder"):
        _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=inp, output_state_folder=out)
    first.update(chunk)
    assert not (user_dir / ".out.lock").exists()  # removed when the update ended
    # the lock is taken before the input is read: a second writer built now reads the first's output
    second = _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=out,
                      output_state_folder=user_dir / "out2")  # fmt: skip
    assert second.learner.updates_done == 2


def test_inputs_are_byte_identical_after_an_update(user_dir: Path, chunk) -> None:
    inp = user_dir / "runs" / "v1"
    before = tree_digest(inp)
    _updater(ExperienceReplayModelUpdater, memory_size=30, input_state_folder=inp,
             output_state_folder=user_dir / "v3").update(chunk)  # fmt: skip
    assert tree_digest(inp) == before


# ------------------------------------------------------- finding 3: leftovers, globs and planted links
@pytest.mark.parametrize("name", ["v[12]", "*", "v?"])
def test_leftover_clean_up_matches_exact_names_never_globs(tmp_path: Path, pristine_state: Path, name: str) -> None:
    import shutil

    others = {
        ".v1.tmp-123-0123abcd": "dir",  # another folder's in-progress write
        ".v2.old-456-89abcdef": "state",  # another folder's recovery copy
    }
    for entry, kind in others.items():
        if kind == "state":
            shutil.copytree(pristine_state, tmp_path / entry)
        else:
            (tmp_path / entry).mkdir()
            (tmp_path / entry / "model.safetensors").write_bytes(b"partial")
    before = tree_digest(tmp_path)
    with OutputLock(tmp_path / name):
        pass
    remove_stale_temporaries(tmp_path / name)
    assert tree_digest(tmp_path) == before


def test_a_planted_lock_symlink_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    (tmp_path / ".out.lock").symlink_to(target)
    with pytest.raises(StateError, match="the lock file is a symbolic link"):
        _updater(output_state_folder=tmp_path / "out")
    assert not target.exists()


def test_a_planted_recovery_copy_is_not_renamed_into_place(tmp_path: Path, pristine_state: Path) -> None:
    import shutil

    planted = tmp_path / ".out.old-1-deadbeef"
    shutil.copytree(pristine_state, planted)
    (planted / "model.safetensors").write_bytes(b"tampered")  # checksums no longer match
    user = tmp_path / ".out.old-2-cafebabe"
    user.symlink_to(tmp_path / "elsewhere")
    with OutputLock(tmp_path / "out"):
        pass
    assert not (tmp_path / "out").exists()  # nothing unverified took the output's place
    assert not planted.exists() and not user.is_symlink()  # retain's own leftovers are cleared


def test_a_verified_recovery_copy_is_put_back(tmp_path: Path, pristine_state: Path) -> None:
    import shutil

    shutil.copytree(pristine_state, tmp_path / ".out.old-7-0badf00d")  # a kill between the two renames
    with OutputLock(tmp_path / "out"):
        pass
    assert tree_digest(tmp_path / "out") == tree_digest(pristine_state)


# ---------------------------------------------------------------------- finding 13: retain benchmark
def test_benchmark_into_a_file_is_refused_before_loading_data(tmp_path: Path) -> None:
    from retain.cli import main

    target = tmp_path / "report"
    target.write_text("my file")
    assert main(["benchmark", "--output", str(target), "--no-progress"]) == 2
    assert target.read_text() == "my file"


def test_two_benchmarks_into_one_output_do_not_overlap(tmp_path: Path) -> None:
    from retain.benchmark import BenchmarkConfig, run_benchmark

    with OutputLock(tmp_path / "run" / "state"), pytest.raises(StateLockedError, match="another update"):
        run_benchmark(BenchmarkConfig(output=str(tmp_path / "run")), log=lambda *_: None)


def test_benchmark_never_deletes_user_files_in_its_state_folder(tmp_path: Path) -> None:
    from retain.benchmark import BenchmarkConfig, run_benchmark

    seed_root = tmp_path / "run" / "state" / "seed0"
    seed_root.mkdir(parents=True)
    (seed_root / "update0").mkdir()
    (seed_root / "update0" / "mine.txt").write_text("mine")
    with pytest.raises(StateError, match="refusing to delete"):
        run_benchmark(BenchmarkConfig(output=str(tmp_path / "run"), num_tasks=2, training_options={"max_epochs": 1,
                      "progress_bar": False}), log=lambda *_: None)  # fmt: skip
    assert (seed_root / "update0" / "mine.txt").read_text() == "mine"


# ------------------------------------------------------------------------ the writer's own checks
def test_write_state_refuses_to_replace_what_is_not_a_state(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a")
    manifest = {"retain_version": "x", "method": "m", "model": {"class": "c", "hyperparameters": {}, "task_ids": []},
                "method_options": {}, "options": {}, "updates_done": 0, "task_ids_seen": []}  # fmt: skip
    with pytest.raises(StateError, match="refusing to replace"):
        write_state(tmp_path / "docs", manifest, {"a.json": {}}, {})
    assert (tmp_path / "docs" / "a.txt").read_text() == "a"
    folder = write_state(tmp_path / "s", manifest, {"a.json": {"k": 1}}, {"t.safetensors": {"x": torch.ones(3)}})
    state = StateFolder(folder)
    assert state.json("a.json") == {"k": 1} and torch.equal(state.tensors("t.safetensors")["x"], torch.ones(3))


def test_state_files_are_standard_safetensors(pristine_state: Path) -> None:
    from safetensors.torch import load_file

    ours = StateFolder(pristine_state).tensors("memory.safetensors")
    theirs = load_file(str(pristine_state / "memory.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_der_state_round_trip_through_the_new_writer(tmp_path: Path, chunk) -> None:
    a = _updater(DarkExperienceReplayModelUpdater, memory_size=30, output_state_folder=tmp_path / "a")
    a.update(chunk)
    b = _updater(DarkExperienceReplayModelUpdater, memory_size=30, input_state_folder=tmp_path / "a")
    for name, tensor in a.learner.memory.state_dict()[1].items():
        assert torch.equal(tensor, b.learner.memory.state_dict()[1][name]), name
    json.dumps(StateFolder(tmp_path / "a").manifest)


def test_an_output_changed_on_the_updater_is_checked_and_locked(tmp_path: Path, chunk) -> None:
    updater = _updater(output_state_folder=tmp_path / "a")
    updater.update(chunk)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "f.txt").write_text("x")
    updater.output_state_folder = tmp_path / "mine"
    with pytest.raises(StateError, match="not a retain state folder"):
        updater.update(chunk)
    assert (tmp_path / "mine" / "f.txt").read_text() == "x"
    updater.output_state_folder = tmp_path / "b"
    with OutputLock(tmp_path / "b"), pytest.raises(StateLockedError, match="another update"):
        updater.update(chunk)
    updater.update(chunk)
    assert StateFolder(tmp_path / "b").manifest["updates_done"] == 2  # the refused updates trained nothing


def test_the_output_lock_is_reentrant_and_released_by_its_last_holder(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    lock.acquire()  # the updater takes it again for its update
    lock.release()
    assert lock.held and (tmp_path / ".out.lock").exists()
    with pytest.raises(StateLockedError, match="another update"):
        OutputLock(tmp_path / "out").acquire()
    lock.release()
    assert not lock.held and not (tmp_path / ".out.lock").exists()
    OutputLock(tmp_path / "out").acquire().release()  # free again


@pytest.mark.parametrize("name", ["Bad.json", "manifest.json", "../x.json", "a.pkl"])
def test_write_state_refuses_file_names_that_are_not_plain_state_files(tmp_path: Path, name: str) -> None:
    manifest = {"retain_version": "x", "method": "m", "model": {"class": "c", "hyperparameters": {}, "task_ids": []},
                "method_options": {}, "options": {}, "updates_done": 0, "task_ids_seen": []}  # fmt: skip
    with pytest.raises(ValueError, match="invalid state file name"):
        write_state(tmp_path / "s", manifest, {name: {}}, {})
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_the_output_lock_used_as_a_context_manager_is_released_when_the_block_ends(tmp_path: Path) -> None:
    from retain.state import StateLockedError

    with OutputLock(tmp_path / "out") as lock:
        assert lock.held
        with pytest.raises(StateLockedError, match=r"^another update is writing the state folder .*out \(lock"):
            OutputLock(tmp_path / "out").acquire()
    assert not lock.held and not (tmp_path / ".out.lock").exists()
    OutputLock(tmp_path / "out").acquire().release()  # free for the next writer


def test_a_stale_temporary_that_cannot_be_removed_does_not_stop_the_next_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cleaning up after a killed writer is best effort: a leftover folder the OS refuses to remove
    (here its rmdir fails) is emptied as far as possible and left, without an error."""
    stale = tmp_path / ".out.tmp-12345-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    real_rmdir = os.rmdir

    def rmdir(path: str | os.PathLike, *args: object, **kwargs: object) -> None:
        if ".tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    remove_stale_temporaries(tmp_path / "out")
    assert stale.is_dir() and not (stale / "model.safetensors").exists()
