"""Every file and folder on the path of a state write is flushed to disk before and after its rename.

A spy on ``os.fsync`` records the path of every descriptor synced (read from /proc/self/fd), a spy
on ``os.rename`` records the renames in the same sequence, so the order is checked too: each file
of the folder is synced while it is still in the temporary folder, the temporary folder itself is
synced before it is renamed into place, and the parent folder after the rename (the rename
itself is then durable). A spy on ``os.link`` records hard links: a file a state links from its
input (Joint's chunks) is not synced again, so the folder's sync must come after its last link.

The second part tests the updater around the state (``retain.updaters.base``): the device it
picks, which rank takes the output lock and when it is released, the hand-off to the distributed
runner, the refusal of hand-edited learner and memory files (each naming the file), copies in the
state payload, hard-linked validation chunks, and ``load_model``'s paths (recorded model, model
given, plain module, float64, retries on a folder replaced while read).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.methods import DarkExperienceReplayModelUpdater
from state_edits import rewrite_state

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


# ------------------------------------------------------------------ the updater around the state
def _updater(input_state: Path | None = None, output: Path | None = None, model: Any = None,
             **options: Any) -> DarkExperienceReplayModelUpdater:  # fmt: skip
    torch.manual_seed(0)
    return DarkExperienceReplayModelUpdater(
        model if model is not None else MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=8, batch_size=4, max_epochs=1,
        accelerator="cpu", input_state_folder=input_state, output_state_folder=output, **options,
    )  # fmt: skip


def test_resolve_device_gives_the_device_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU unless a GPU is asked for (and present) or 'auto' finds one; ranks of a multi-device
    update take cuda:LOCAL_RANK, a single-device update plain cuda."""
    from retain.updaters.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu", None) == torch.device("cpu")
    assert resolve_device("auto", 2) == torch.device("cpu")
    for accelerator in ("gpu", "cuda"):
        with pytest.raises(RuntimeError, match=rf"^accelerator='{accelerator}' was asked for, but no CUDA GPU"):
            resolve_device(accelerator, None)
    with pytest.raises(RuntimeError, match=r"^accelerator='mps' was asked for, but MPS is not available"):
        resolve_device("mps", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps", None) == torch.device("mps")
    assert resolve_device("auto", None) == torch.device("cpu"), "auto never picks MPS"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("gpu", 2) == torch.device("cuda")
    assert resolve_device("cpu", 2) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("gpu", 2) == torch.device("cuda", 1)
    assert resolve_device("auto", 3) == torch.device("cuda", 1)
    assert resolve_device("cuda", 1) == torch.device("cuda")
    assert resolve_device("cuda", None) == torch.device("cuda")


@pytest.mark.parametrize(("devices", "strategy", "ddp"), [
    (None, "ddp", False), (1, "ddp", False), (2, "ddp", True), (2, "ddp_spawn", True), (2, "auto", True),
    (2, None, True), (1, "single_device", False),
])  # fmt: skip
def test_wants_ddp_only_for_several_devices_and_a_ddp_strategy(devices: int | None, strategy: str | None,
                                                               ddp: bool) -> None:  # fmt: skip
    from retain.options import TrainingOptions
    from retain.updaters.base import wants_ddp

    assert wants_ddp(TrainingOptions.from_kwargs("X", devices=devices, strategy=strategy)) is ddp


def test_seed_update_seeds_the_global_generator_per_update() -> None:
    from retain.options import update_seed
    from retain.updaters.base import seed_update

    seed_update(3, 2)
    drawn = torch.rand(4)
    torch.manual_seed(update_seed(3, 2))
    assert torch.equal(drawn, torch.rand(4))
    seed_update(3, 1)
    assert not torch.equal(torch.rand(4), drawn)


@pytest.mark.parametrize("before", [False, True])
def test_deterministic_switches_torch_on_only_inside_and_restores_it(before: bool) -> None:
    from retain.updaters.base import deterministic

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(before)
    try:
        with deterministic(True):
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled() is before
        with deterministic(False):
            assert torch.are_deterministic_algorithms_enabled() is before
        with pytest.raises(KeyError, match=r"inside"), deterministic(True):
            raise KeyError("inside")
        assert torch.are_deterministic_algorithms_enabled() is before
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize(("env", "secondary"), [
    ({}, False), ({"RANK": "0"}, False), ({"RANK": ""}, False), ({"RANK": "1"}, True), ({"RANK": "3"}, True),
    ({"RETAIN_SPAWNED_RANK": "1"}, True), ({"RETAIN_SPAWNED_RANK": "0"}, False),
])  # fmt: skip
def test_only_the_first_rank_takes_the_output_lock(env: dict[str, str], secondary: bool, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from retain.updaters.base import secondary_rank

    for name in ("RANK", "RETAIN_SPAWNED_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert secondary_rank() is secondary
    updater = _updater(output=tmp_path / "v0")
    assert (updater.output_lock is None) is secondary
    locks = [p.name for p in tmp_path.iterdir()]
    assert bool(locks) is not secondary, locks
    updater.release_output_lock()
    assert list(tmp_path.iterdir()) == []


def test_update_releases_every_hold_of_the_lock_and_takes_a_new_folders_lock(tmp_path: Path) -> None:
    """The lock taken at construction and again by update() are both released at its end; an
    output_state_folder set afterwards is locked (and written) instead, the old lock is not kept."""
    from retain.state import resolved

    updater = _updater(output=tmp_path / "v0")
    assert updater.output_lock is not None and updater.output_lock.held
    updater.update(data())
    assert not updater.output_lock.held and sorted(p.name for p in tmp_path.iterdir()) == ["v0"]
    updater.output_state_folder = tmp_path / "v1"
    updater.update(data())
    assert updater.output_lock.folder == resolved(tmp_path / "v1") and not updater.output_lock.held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0", "v1"]
    updater.output_state_folder = tmp_path / "v1" / "inner"
    updater.input_state_folder = tmp_path / "v1" / "inner"
    from retain.state import StateError

    with pytest.raises(StateError, match=r"v1/inner is the input state folder"):
        updater.update(data())


def test_a_multi_process_update_goes_to_the_distributed_runner(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """devices > 1: update() hands its arguments to ``run_distributed`` and returns the user's own
    module (a plain nn.Module unwrapped); without the runner it says what to import."""
    from retain.updaters.base import ModelUpdater

    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    updater = _updater(output=tmp_path / "v0", model=module, devices=2)
    calls: list[tuple[Any, ...]] = []

    def runner(self: Any, *args: Any) -> Any:
        calls.append((self, *args))
        assert self.output_lock.held
        return self.learner.inference_model()

    monkeypatch.setattr(ModelUpdater, "run_distributed", runner)
    train, val = data(), data()
    assert updater.update(train, val, stacking, None, "t1") is module
    assert calls == [(updater, train, val, stacking, None, "t1")]
    assert not updater.output_lock.held
    monkeypatch.setattr(ModelUpdater, "run_distributed", None)
    with pytest.raises(RuntimeError, match=r"^import retain.updaters to run multi-process updates"):
        updater.update(train)
    assert not updater.output_lock.held


def stacking(items: list[Any]) -> Any:
    inputs, targets = zip(*items, strict=True)
    return torch.stack(inputs), torch.stack(targets)


def test_the_base_updater_has_no_training_of_its_own() -> None:
    from retain.updaters.base import ModelUpdater

    updater = ModelUpdater(MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.1), accelerator="cpu")  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"^$"):
        updater.update(data())


def test_method_options_keep_only_scalars_and_none(tmp_path: Path) -> None:
    updater = _updater()
    updater.learner_kwargs = {"a": None, "b": [1], "c": 2.5, "d": "x", "e": True, "f": 3, "g": print}
    assert updater.method_options() == {"a": None, "c": 2.5, "d": "x", "e": True, "f": 3}


def test_the_state_payload_is_a_copy_without_addresses(tmp_path: Path) -> None:
    """Tensors are copies (a later step does not change a checkpoint being written), callables in the
    options appear without their memory address, and save_state returns the folder written."""
    from retain.state import resolved

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x

    updater = _updater(output=tmp_path / "v0", train_transform=transform)
    manifest, json_files, tensors = updater.state_payload()
    assert " at 0x" in repr(transform)
    assert manifest["options"]["train_transform"] == repr(transform).split(" at ")[0] + ">"
    weights = tensors["model.safetensors"]
    before = {k: v.clone() for k, v in weights.items()}
    with torch.no_grad():
        for p in updater.model.parameters():
            p.add_(1.0)
    assert all(torch.equal(weights[k], before[k]) for k in before)
    generator = tensors["learner.safetensors"]["generator_state"]
    torch.rand(1, generator=updater.learner.generator)
    assert not torch.equal(generator, updater.learner.generator.get_state()), "the learner's state was not copied"
    assert manifest["updates_done"] == 0 and manifest["task_ids_seen"] == [] and set(json_files) == {
        "learner.json", "memory.json"}  # fmt: skip
    assert updater.save_state(tmp_path / "v0") == resolved(tmp_path / "v0")
    updater.release_output_lock()


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "v0"
    _update(folder, task_id="t1")
    return folder


def _edited(saved_state: Path, tmp_path: Path, manifest_edit: Any = None, **edits: Any) -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved_state, folder)
    rewrite_state(folder, manifest_edit, **edits)
    return folder


@pytest.mark.parametrize(("edit", "message"), [
    (lambda j: {**j, "global_step": -1}, "learner.json: global_step must be >= 0, got -1"),
    (lambda j: {**j, "updates_done": -1}, "learner.json: updates_done must be >= 0, got -1"),
    (lambda j: {**j, "updates_done": 2}, "learner.json: updates_done 2 differs from the manifest's"),
    (lambda j: {**j, "task_ids_seen": ["zz"]}, r"learner.json: task_ids_seen \['zz'\] differs from the manifest's"),
])  # fmt: skip
def test_a_learner_json_edited_by_hand_is_refused(edit: Any, message: str, saved_state: Path, tmp_path: Path) -> None:
    from retain.state import StateError

    folder = _edited(saved_state, tmp_path, learner_json=edit)
    with pytest.raises(StateError, match=message):
        _updater(folder)


def test_a_learner_json_at_the_bounds_loads(saved_state: Path, tmp_path: Path) -> None:
    folder = _edited(saved_state, tmp_path, learner_json=lambda j: {**j, "global_step": 0})
    assert _updater(folder).learner.global_step == 0


def test_learner_tensors_that_do_not_fit_are_refused(saved_state: Path, tmp_path: Path) -> None:
    from retain.state import StateError

    folder = _edited(saved_state, tmp_path, learner_safetensors=lambda t: {"other": torch.zeros(3)})
    with pytest.raises(StateError, match=r"learner.safetensors: learner state does not fit "
                                         r"DarkExperienceReplayModelUpdater: KeyError"):  # fmt: skip
        _updater(folder)
    folder = _edited(saved_state, tmp_path / "b", learner_safetensors=lambda t: {**t, "other": torch.zeros(3)})
    with pytest.raises(StateError, match=r"learner.safetensors"):
        _updater(folder)


def test_load_model_gives_the_recorded_model_in_eval_mode_or_loads_into_the_one_given(saved_state: Path) -> None:
    import retain

    rebuilt = retain.load_model(saved_state)
    assert isinstance(rebuilt, MultiLayerPerceptron) and not rebuilt.training
    fresh = MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))
    assert retain.load_model(saved_state, model=fresh) is fresh and not fresh.training
    assert fresh.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in fresh.state_dict().items())
    from retain.state import StateError

    with pytest.raises(StateError, match=r"but the model given is a MultiLayerPerceptron with"):
        retain.load_model(saved_state, model=MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(9,)))


def test_a_plain_modules_state_needs_the_module(tmp_path: Path) -> None:
    import retain
    from retain.state import StateError

    torch.manual_seed(0)
    _updater(output=tmp_path / "v0", model=torch.nn.Sequential(torch.nn.Linear(4, 3))).update(data())
    with pytest.raises(StateError, match=r"records no constructor: rebuild it with "
                                         r"retain.load_model\(folder, model=Sequential\(...\)\)"):  # fmt: skip
        retain.load_model(tmp_path / "v0")
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    loaded = retain.load_model(tmp_path / "v0", model=module)
    assert loaded is module and not module.training


def test_a_float64_state_loads_as_float64(tmp_path: Path) -> None:
    import retain

    _updater(output=tmp_path / "v0", precision="64").update(data())
    assert {p.dtype for p in retain.load_model(tmp_path / "v0").parameters()} == {torch.float64}
    continued = _updater(tmp_path / "v0", precision="64")
    assert {p.dtype for p in continued.model.parameters()} == {torch.float64}
    fresh = MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))
    assert {p.dtype for p in retain.load_model(tmp_path / "v0", model=fresh).parameters()} == {torch.float64}


def _hyperparameters(**changes: Any) -> Any:
    def edit(manifest: dict[str, Any]) -> dict[str, Any]:
        model = manifest["model"]
        return {**manifest, "model": {**model, "hyperparameters": {**model["hyperparameters"], **changes}}}

    return edit


def test_a_recorded_model_that_cannot_be_built_or_does_not_fit_is_refused(saved_state: Path, tmp_path: Path) -> None:
    import retain
    from retain.state import StateError

    with pytest.raises(StateError, match=r"manifest.json: cannot rebuild the recorded model: .*colour"):
        retain.load_model(_edited(saved_state, tmp_path / "a", _hyperparameters(colour=1)))
    with pytest.raises(StateError, match=r"model.safetensors.*the recorded model needs"):
        retain.load_model(_edited(saved_state, tmp_path / "b", _hyperparameters(hidden_sizes=[9])))

    def many_heads(manifest: dict[str, Any]) -> dict[str, Any]:
        return {**manifest, "model": {**manifest["model"], "task_ids": [f"t{i}" for i in range(50)]}}

    with pytest.raises(StateError, match=r"model.safetensors holds 6 tensors, too few for the 50 task heads listed"):
        retain.load_model(_edited(saved_state, tmp_path / "c", many_heads))


def test_load_model_retries_a_folder_replaced_while_it_read(saved_state: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A read that fails while the folder is replaced is retried (4 tries, growing pauses); a failure
    on a folder that stayed the same is raised at once."""
    import shutil

    import retain
    import retain.updaters.base as base
    from retain.state import StateError

    folder = tmp_path / "v0"
    shutil.copytree(saved_state, folder)
    real = base._load_model_once
    calls: list[int] = []
    pauses: list[float] = []
    replacements = iter(range(100))
    monkeypatch.setattr(base.time, "sleep", pauses.append)

    def replaced_then(times: int) -> Any:
        def load(state_folder: Any, model: Any) -> Any:
            calls.append(1)
            if len(calls) <= times:
                os.rename(folder, tmp_path / f"old{next(replacements)}")
                shutil.copytree(saved_state, folder)
                raise StateError("read while replaced")
            return real(state_folder, model)

        return load

    monkeypatch.setattr(base, "_load_model_once", replaced_then(1))
    assert isinstance(retain.load_model(folder), MultiLayerPerceptron) and len(calls) == 2
    assert pauses == [0.02]
    calls.clear()
    pauses.clear()
    monkeypatch.setattr(base, "_load_model_once", replaced_then(9))
    with pytest.raises(StateError, match=r"^read while replaced$"):
        retain.load_model(folder)
    assert len(calls) == 4 and pauses == pytest.approx([0.02, 0.04, 0.06])

    def unchanged(state_folder: Any, model: Any) -> Any:
        calls.append(1)
        raise OSError("read failed")

    calls.clear()
    monkeypatch.setattr(base, "_load_model_once", unchanged)
    with pytest.raises(OSError, match=r"^read failed$"):
        retain.load_model(folder)
    with pytest.raises(OSError, match=r"^read failed$"):
        retain.load_model(tmp_path / "missing")
    assert len(calls) == 2


def test_memory_targets_outside_the_models_classes_are_refused(saved_state: Path, tmp_path: Path) -> None:
    """The model's number of outputs bounds the stored labels (a label 7 for 3 outputs is refused)."""
    from retain.state import StateError

    def label_seven(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**tensors, "targets": torch.full_like(tensors["targets"], 7)}

    folder = _edited(saved_state, tmp_path, memory_safetensors=label_seven)
    with pytest.raises(StateError, match=r"memory.safetensors: .*targets must lie in \[0, 2\]"):
        _updater(folder)


def test_an_updater_asked_for_a_missing_gpu_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"^accelerator='gpu' was asked for, but no CUDA GPU is available"):
        DarkExperienceReplayModelUpdater(
            MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)), memory_size=8, accelerator="gpu",
            output_state_folder=tmp_path / "v0",
        )
    assert list(tmp_path.iterdir()) == [], "the output lock was left behind"


def test_a_refused_input_state_releases_the_output_lock(saved_state: Path, tmp_path: Path) -> None:
    from retain.state import StateError

    folder = _edited(saved_state, tmp_path / "in", learner_json=lambda j: {**j, "global_step": -1})
    with pytest.raises(StateError, match=r"global_step must be >= 0"):
        _updater(folder, output=tmp_path / "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    _updater(output=tmp_path / "v1").release_output_lock()  # not locked out by the failed one


@pytest.mark.parametrize(("edit", "message"), [
    (lambda j: {**j, "extra": 1}, r"learner.json: unknown keys \['extra'\], missing keys \[\]"),
    (lambda j: {k: v for k, v in j.items() if k != "global_step"},
     r"unknown keys \[\], missing keys \['global_step'\]"),
    (lambda j: {**j, "global_step": "8"}, r"learner.json: expected an integer at 'global_step', got str '8'"),
])  # fmt: skip
def test_a_learner_json_of_another_shape_is_refused(edit: Any, message: str, saved_state: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    from retain.state import StateError

    with pytest.raises(StateError, match=message):
        _updater(_edited(saved_state, tmp_path, learner_json=edit))


def test_an_updater_given_an_output_folder_later_locks_and_writes_it(tmp_path: Path) -> None:
    updater = _updater()
    assert updater.output_lock is None
    updater.output_state_folder = tmp_path / "v0"
    model = updater.update(data())
    assert model is updater.learner.inference_model() and isinstance(model, MultiLayerPerceptron)
    assert (tmp_path / "v0" / "manifest.json").is_file() and not updater.output_lock.held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0"]


def test_a_plain_module_continues_from_its_state_with_validation_data(tmp_path: Path) -> None:
    """A plain nn.Module declares no number of outputs: its stored labels and validation chunks are
    not bounded by one (a bound of 1 would refuse labels 1 and 2)."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    assert _updater(output=tmp_path / "v0", model=module).update(data(), data()) is module
    again = torch.nn.Sequential(torch.nn.Linear(4, 3))
    assert _updater(tmp_path / "v0", output=tmp_path / "v1", model=again).update(data(), data()) is again
    assert (tmp_path / "v1" / "manifest.json").is_file()


def test_validation_chunks_of_earlier_updates_are_hard_linked_not_rewritten(tmp_path: Path) -> None:
    """validation_data='all': the same updater's second state links the chunk its first state wrote,
    and an updater continuing a state links every chunk of it."""
    from retain.val_history import val_chunk_name

    def inode(folder: str, update: int) -> int:
        return os.stat(tmp_path / folder / val_chunk_name(update)).st_ino

    updater = _updater(output=tmp_path / "v0")
    updater.update(data(), data())
    updater.output_state_folder = tmp_path / "v1"
    updater.update(data(), data())
    assert inode("v0", 0) == inode("v1", 0)
    _updater(tmp_path / "v1", output=tmp_path / "v2").update(data(), data())
    assert inode("v1", 0) == inode("v2", 0) and inode("v1", 1) == inode("v2", 1)
    assert (tmp_path / "v2" / val_chunk_name(2)).is_file()


def test_secondary_rank_reads_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from retain.updaters.base import secondary_rank

    for name in ("RANK", "RETAIN_SPAWNED_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for rank, secondary in ((0, False), (1, True), (2, True)):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        assert secondary_rank() is secondary, rank
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert secondary_rank() is False


def test_as_many_task_heads_as_weights_is_not_refused_as_too_many(saved_state: Path, tmp_path: Path) -> None:
    import retain
    from retain.state import StateError

    def six_heads(manifest: dict[str, Any]) -> dict[str, Any]:
        return {**manifest, "model": {**manifest["model"], "task_ids": [f"t{i}" for i in range(6)]}}

    with pytest.raises(StateError, match=r"model.safetensors") as raised:
        retain.load_model(_edited(saved_state, tmp_path, six_heads))
    assert "too few" not in str(raised.value)


def test_non_finite_weights_are_refused(saved_state: Path, tmp_path: Path) -> None:
    import retain
    from retain.state import StateError

    def nan_first(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = sorted(tensors)[0]
        return {**tensors, name: torch.full_like(tensors[name], float("nan"))}

    folder = _edited(saved_state, tmp_path, model_safetensors=nan_first)
    with pytest.raises(StateError, match=r"model.safetensors: tensor '.*' contains NaN or Inf"):
        retain.load_model(folder)
    with pytest.raises(StateError, match=r"model.safetensors: tensor '.*' contains NaN or Inf"):
        _updater(folder)


def test_a_new_task_head_is_drawn_from_the_update_seed_not_the_callers_generator(tmp_path: Path) -> None:
    """update() seeds the global generator from (seed, updates done) first: a head added by the
    update does not depend on what the caller drew before."""
    import retain

    for name, caller_seed in (("a", 1), ("b", 2)):
        updater = _updater(output=tmp_path / name, seed=3)
        torch.manual_seed(caller_seed)
        updater.update(data(), task_id="new")
    a, b = retain.load_model(tmp_path / "a").state_dict(), retain.load_model(tmp_path / "b").state_dict()
    assert any(k.startswith("heads.new.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from retain.options import update_seed

    assert torch.initial_seed() == update_seed(3, 0), "the global generator was not seeded for update 0 of seed 3"
    updater.update(data(), task_id="new")
    assert torch.initial_seed() == update_seed(3, 1)


def test_a_corrupt_validation_chunk_is_refused_when_the_state_is_loaded(tmp_path: Path) -> None:
    """Only an updater that joins a background verification may defer it; the others hash the
    mapped files (validation chunks) at load, so a flipped bit is refused before training."""
    from retain.state import StateError
    from retain.val_history import val_chunk_name

    _updater(output=tmp_path / "v0").update(data(), data())
    path = tmp_path / "v0" / val_chunk_name(0)
    corrupt = bytearray(path.read_bytes())
    corrupt[-3] ^= 0x01
    path.write_bytes(bytes(corrupt))
    with pytest.raises(StateError, match=rf"{val_chunk_name(0)}.*checksum"):
        _updater(tmp_path / "v0")


def test_a_memory_without_the_columns_the_method_replays_is_refused(saved_state: Path, tmp_path: Path) -> None:
    """DER replays stored logits: a memory saved without them is refused at load, not mid-update."""
    from retain.state import StateError

    folder = _edited(
        saved_state, tmp_path, memory_json=lambda m: {**m, "metadata_names": []},
        memory_safetensors=lambda t: {k: v for k, v in t.items() if k != "metadata.logits"},
    )  # fmt: skip
    with pytest.raises(StateError, match=r"memory\..*logits"):
        _updater(folder)


def test_a_failed_resume_load_leaves_the_updater_loading_plain_states(tmp_path: Path) -> None:
    """load_resume_state expects the chunks the update holds; after it fails, load_state of the same
    state works (the resume mode does not stick)."""
    from retain.state import StateError, StateFolder
    from retain.val_history import val_chunk_name

    _updater(output=tmp_path / "v0").update(data(), data())
    updater = _updater()
    with pytest.raises(StateError, match=r"learner.json: val_chunks .* differ from the update's"):
        updater.load_resume_state(StateFolder(tmp_path / "v0"))
    updater.load_state(StateFolder(tmp_path / "v0"))
    assert updater.learner.updates_done == 1 and updater.learner.val_history.names == [val_chunk_name(0)]


def test_joint_defers_hashing_its_stored_chunks_to_the_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JointModelUpdater asks for the background verification of its chunks: built on a state with a
    corrupt chunk it starts (no hashing at load), and its update refuses the chunk before writing;
    with the background verification switched off the load itself refuses it."""
    from retain.methods import JointModelUpdater
    from retain.state import StateError

    def joint(input_state: Path | None = None, output: Path | None = None) -> JointModelUpdater:
        return JointModelUpdater(
            MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=4, max_epochs=1, accelerator="cpu",
            input_state_folder=input_state, output_state_folder=output,
        )  # fmt: skip

    joint(output=tmp_path / "v0").update(data())
    path = tmp_path / "v0" / "chunk_000000.safetensors"
    corrupt = bytearray(path.read_bytes())
    corrupt[-3] ^= 0x01
    path.write_bytes(bytes(corrupt))
    started = joint(tmp_path / "v0", tmp_path / "v1")
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        started.update(data())
    assert not (tmp_path / "v1").exists()
    monkeypatch.setattr(JointModelUpdater, "verify_chunks_in_background", False)
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        joint(tmp_path / "v0")
