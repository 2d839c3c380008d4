"""Every file and folder on the path of a state write is flushed to disk before and after its rename.

A spy on ``os.fsync`` records the path of every descriptor synced (read from /proc/self/fd), a spy
on ``os.rename`` records the renames in the same sequence, so the order is checked too: each file
of the folder is synced while it is still in the temporary folder, the temporary folder itself is
synced before it is renamed into place, and the parent folder after the rename (the rename
itself is then durable). A spy on ``os.link`` records hard links: a file a state links from its
input (Joint's chunks) is not synced again, so the folder's sync must come after its last link.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.methods import DarkExperienceReplayModelUpdater

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))


@pytest.fixture
def disk_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """("fsync", path), ("rename", source, destination) and ("link", source, destination) in the
    order they happen."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> None:
        log.append(("rename", str(Path(src).absolute()), str(Path(dst).absolute())))
        real_rename(src, dst, **kwargs)

    def link(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> None:
        real_link(src, dst, **kwargs)
        log.append(("link", str(Path(src).absolute()), str(Path(dst).absolute())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    return log


def check_durable_write(log: list[tuple[str, ...]], folder: Path, linked: frozenset[str] = frozenset()) -> None:
    """``folder`` was written as a synced temporary folder, renamed into place, then its parent
    synced; the files named in ``linked`` were hard-linked into it instead of written and synced."""
    folder = folder.absolute()
    into_place = [i for i, e in enumerate(log) if e[0] == "rename" and e[2] == str(folder)]
    assert into_place, f"{folder} was not renamed into place"
    at = into_place[-1]
    tmp = Path(log[at][1])
    assert tmp.parent == folder.parent and tmp.name.startswith(f".{folder.name}.")
    synced_before = [Path(e[1]) for e in log[:at] if e[0] == "fsync"]
    links = {Path(e[2]).name for e in log[:at] if e[0] == "link" and Path(e[2]).parent == tmp}
    assert links == linked, f"hard-linked {sorted(links)}, expected {sorted(linked)}"
    for name in sorted(p.name for p in folder.iterdir()):
        if name not in linked:
            assert tmp / name in synced_before, f"{name} was not fsynced before the folder was renamed into place"
    assert tmp in synced_before, "the temporary folder itself was not fsynced before its rename"
    last_entry = max(i for i, e in enumerate(log[:at]) if e[0] in ("fsync", "link") and Path(e[-1]).parent == tmp)
    dir_syncs = [i for i, e in enumerate(log[:at]) if e[0] == "fsync" and Path(e[1]) == tmp]
    assert max(dir_syncs) > last_entry, "the temporary folder was synced before its last file or link"
    after = [Path(e[1]) for e in log[at + 1 :] if e[0] == "fsync"]
    assert folder.parent in after, "the parent folder was not fsynced after the rename"


def test_every_file_and_folder_of_a_state_write_is_fsynced(disk_log: list[tuple[str, ...]], tmp_path: Path) -> None:
    updater = DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=1,
        accelerator="cpu", output_state_folder=tmp_path / "state" / "v0",
    )  # fmt: skip
    updater.update(data())
    folder = tmp_path / "state" / "v0"
    assert {p.name for p in folder.iterdir()} >= {"manifest.json", "model.safetensors", "learner.json",
                                                  "learner.safetensors", "memory.json", "memory.safetensors"}
    check_durable_write(disk_log, folder)


def test_a_joint_state_syncs_what_it_writes_and_links_its_inputs_synced_chunks(
    disk_log: list[tuple[str, ...]], tmp_path: Path
) -> None:
    """The second Joint state writes (and syncs) only its own chunk; the first update's chunk is a
    hard link to the file the first state synced, made durable by the folder's sync after it."""
    from retain.methods import JointModelUpdater

    def update(k: int) -> Path:
        JointModelUpdater(
            MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=4, max_epochs=1, accelerator="cpu",
            input_state_folder=tmp_path / f"v{k - 1}" if k else None, output_state_folder=tmp_path / f"v{k}",
        ).update(data())  # fmt: skip
        return tmp_path / f"v{k}"

    first = update(0)
    check_durable_write(disk_log, first)  # chunk_000000 written into the first state and synced there
    disk_log.clear()
    second = update(1)
    assert {p.name for p in second.iterdir()} >= {"chunk_000000.safetensors", "chunk_000001.safetensors"}
    same = os.stat(first / "chunk_000000.safetensors").st_ino == os.stat(second / "chunk_000000.safetensors").st_ino
    assert same, "the first chunk was not hard-linked from the input state"
    check_durable_write(disk_log, second, linked=frozenset({"chunk_000000.safetensors"}))


def test_a_replaced_state_and_a_resume_checkpoint_are_fsynced(disk_log: list[tuple[str, ...]], tmp_path: Path) -> None:
    """Overwriting a state folder, and the in-progress checkpoint of a resumable update, go the same way."""
    def build() -> DarkExperienceReplayModelUpdater:
        return DarkExperienceReplayModelUpdater(
            MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=3,
            accelerator="cpu", output_state_folder=tmp_path / "v0", checkpoint_every_n_epochs=1,
        )  # fmt: skip

    build().update(data())
    resume = tmp_path / ".v0.resume"
    assert any(e[0] == "rename" and e[2] == str(resume.absolute()) for e in disk_log), "no checkpoint was written"
    checkpoint_log = disk_log[: max(i for i, e in enumerate(disk_log) if e[0] == "rename" and e[2] == str(resume))
                              + 1]
    # the checkpoint folder was removed at the end; check its write from the log alone
    at = len(checkpoint_log) - 1
    tmp = Path(checkpoint_log[at][1])
    synced = {Path(e[1]) for e in checkpoint_log if e[0] == "fsync"}
    assert tmp in synced and {"manifest.json", "resume.json", "optimizer.json", "rng.json"} <= {
        p.name for p in synced if p.parent == tmp
    }
    disk_log.clear()
    build().update(data())  # replaces v0
    check_durable_write(disk_log, tmp_path / "v0")


def test_a_state_folder_lists_exactly_the_files_it_holds(tmp_path: Path) -> None:
    from retain.state import StateFolder

    DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=1,
        accelerator="cpu", output_state_folder=tmp_path / "v0",
    ).update(data())  # fmt: skip
    state = StateFolder(tmp_path / "v0")
    assert all(state.has(p.name) for p in (tmp_path / "v0").iterdir() if p.name != "manifest.json")
    assert not state.has("manifest.json") and not state.has("optimizer.json")
    assert state.json("memory.json")["memory_size"] == 8


def _update(output: Path, task_id: str | None = None, input_state: Path | None = None) -> None:
    DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=1,
        accelerator="cpu", input_state_folder=input_state, output_state_folder=output,
    ).update(data(), task_id=task_id)  # fmt: skip


def test_writing_and_reading_states_leaves_no_descriptor_open(tmp_path: Path) -> None:
    from retain.state import StateFolder

    _update(tmp_path / "v0")  # first use: imports and lazy allocations happen here
    before = sorted(os.listdir("/proc/self/fd"))
    for i in range(1, 4):
        _update(tmp_path / f"v{i}", input_state=tmp_path / f"v{i - 1}")
        StateFolder(tmp_path / f"v{i}")
    assert sorted(os.listdir("/proc/self/fd")) == before


def _rewrite_manifest(folder: Path, **changes: object) -> None:
    import json

    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [("updates_done", "1", "int"), ("updates_done", True, "int"), ("method", 3, "str"), ("options", [], "dict"),
     ("task_ids_seen", {}, "list")],
)
def test_manifest_values_of_the_wrong_type_are_refused(key: str, value: object, kind: str, tmp_path: Path) -> None:
    from retain.state import StateError, StateFolder

    _update(tmp_path / "v0")
    _rewrite_manifest(tmp_path / "v0", **{key: value})
    with pytest.raises(StateError, match=rf"'{key}' must be of type {kind}, got {type(value).__name__}"):
        StateFolder(tmp_path / "v0")


@pytest.mark.parametrize(
    "targets", [torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.long)],
    ids=["float", "bool", "2-D"],
)
def test_memory_targets_must_be_1d_integers(targets: torch.Tensor) -> None:
    from retain.memory import MemoryStateError, ReservoirMemory

    memory = ReservoirMemory(8)
    memory.add(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    meta, tensors = memory.state_dict()
    with pytest.raises(MemoryStateError, match="targets must be a 1-D int64 tensor"):
        ReservoirMemory(8).load_state_dict(meta, {**tensors, "targets": targets}, num_classes=3)
    ReservoirMemory(8).load_state_dict(meta, tensors, num_classes=3)


def test_a_state_with_task_heads_loads_into_a_fresh_model(tmp_path: Path) -> None:
    """The heads named in the manifest are added to the model given, then their weights loaded."""
    import retain

    _update(tmp_path / "v0", task_id="t1")
    saved = retain.load_model(tmp_path / "v0").state_dict()
    updater = DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=1,
        accelerator="cpu", input_state_folder=tmp_path / "v0",
    )  # fmt: skip
    loaded = updater.model.state_dict()
    assert any(k.startswith("heads.t1.") for k in loaded)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
