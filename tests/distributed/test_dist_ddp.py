"""Multi-process (DDP, gloo on CPU) updates on digits: 2 ranks then 1 process, 1 then 2, the memory
gathered from and re-shared to real ranks, and a failing worker (retain.updaters.distributed)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from retain.memory import ReservoirMemory
from retain.methods import DarkExperienceReplayModelUpdater, ExperienceReplayModelUpdater
from retain.models import MultiLayerPerceptron
from retain.state import StateFolder
from retain.updaters import load_model
from retain.updaters.distributed import DistributedUpdateError, _start_method, gather_memory, shard_memory

METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "er": (ExperienceReplayModelUpdater, {}),
    "derpp": (DarkExperienceReplayModelUpdater, {"alpha": 0.5, "beta": 0.5}),
}
OPTIONS = dict(memory_size=60, batch_size=10, max_epochs=2, seed=0, accelerator="cpu")


def make_updater(method: str, state_in: Path | None, state_out: Path, devices: int = 1, **kw: Any) -> Any:
    cls, extra = METHODS[method]
    torch.manual_seed(0)
    model = MultiLayerPerceptron(64, 10, [64])
    return cls(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), input_state_folder=state_in,
               output_state_folder=state_out, devices=devices, **OPTIONS, **extra, **kw)


def update(method: str, state_in: Path | None, state_out: Path, train: Dataset, devices: int) -> Any:
    updater = make_updater(method, state_in, state_out, devices)
    model = updater.update(train)
    return updater, model


def accuracy(model: torch.nn.Module, tests: list[tuple[Tensor, Tensor]]) -> float:
    x = torch.cat([t[0] for t in tests])
    y = torch.cat([t[1] for t in tests])
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def memory_rows(memory: ReservoirMemory | dict[str, Tensor]) -> list[tuple]:
    """A memory's items (or a saved memory's tensors) as a sorted list of rows: its multiset."""
    if isinstance(memory, ReservoirMemory):
        inputs, targets, metadata = memory.raw_items()
    else:
        inputs, targets = memory["inputs"], memory["targets"]
        metadata = {k[len("metadata.") :]: v for k, v in memory.items() if k.startswith("metadata.")}
    columns = [inputs.flatten(1), targets[:, None].float()] + [metadata[k].flatten(1) for k in sorted(metadata)]
    return sorted(tuple(r) for r in torch.cat(columns, dim=1).tolist())


def schema(folder: Path) -> dict[str, Any]:
    """What must not depend on the number of ranks: file set, memory.json keys, tensor names and shapes."""
    state = StateFolder(folder)
    return {
        "files": sorted(p.name for p in folder.iterdir()),
        "memory_json": sorted(state.json("memory.json")),
        "learner_json": sorted(state.json("learner.json")),
        "tensors": {
            name: {k: tuple(v.shape) for k, v in state.tensors(name).items()}
            for name in ("model.safetensors", "learner.safetensors", "memory.safetensors")
        },
    }


@pytest.fixture(scope="module")
def single_first(digits_tasks: list, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per method: the state after a 1-process update on task {0, 1}."""
    root = tmp_path_factory.mktemp("single_first")
    return {m: update(m, None, root / m, digits_tasks[0][0], devices=1)[0].output_state_folder for m in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_then_one_and_one_then_two(
    method: str, digits_tasks: list, single_first: dict[str, Path], tmp_path: Path
) -> None:
    (train0, test0), (train1, test1) = digits_tasks[0], digits_tasks[1]
    # 2 ranks, then 1 process from their state
    ddp_first, _ = update(method, None, tmp_path / "a1", train0, devices=2)
    _, model_a = update(method, tmp_path / "a1", tmp_path / "a2", train1, devices=1)
    # 1 process, then 2 ranks from its state; and the all-single-process reference
    ddp_second, model_b = update(method, single_first[method], tmp_path / "b2", train1, devices=2)
    _, model_c = update(method, single_first[method], tmp_path / "c2", train1, devices=1)

    # the state does not depend on the number of ranks that wrote it
    assert schema(tmp_path / "a1") == schema(single_first[method])
    assert schema(tmp_path / "a2") == schema(tmp_path / "b2") == schema(tmp_path / "c2")
    a1, s1 = StateFolder(tmp_path / "a1"), StateFolder(single_first[method])
    # 270 items, 2 epochs: each rank offered its 135 items twice; one memory of 60 items, seen = total
    assert a1.json("memory.json") == s1.json("memory.json") == {
        "memory_size": 60, "seen": 540, "metadata_names": ["logits"] if method == "derpp" else [],
        "input_structure": "tensor", "input_leaves": {"": {"dtype": "float32", "shape": [1, 8, 8]}}, "pad_values": {}}
    # steps: 2 epochs of ceil(135 / 3) (each rank takes ceil(5 / 2) of the 5 new items of a step)
    assert a1.manifest["updates_done"] == 1 and a1.json("learner.json")["global_step"] == 90

    # the parent took the ranks' result back: served model and memory are those of the written state
    b2 = StateFolder(tmp_path / "b2")
    assert ddp_second.learner.updates_done == 2 and ddp_first.learner.updates_done == 1
    assert memory_rows(ddp_second.learner.memory) == memory_rows(b2.tensors("memory.safetensors"))
    assert ddp_second.learner.memory.seen == b2.json("memory.json")["seen"]
    reloaded = load_model(tmp_path / "b2")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[name]), name
    assert ddp_second.last_fit is not None and ddp_second.last_fit.epochs == 2

    # trained sensibly: after two tasks, accuracy on their test data close to the 1-process run
    tests = [test0, test1]
    reference = accuracy(model_c, tests)
    assert reference > 0.85
    assert abs(accuracy(model_a, tests) - reference) < 0.08
    assert abs(accuracy(model_b, tests) - reference) < 0.08


# --------------------------------------------------------------------------- memory across real ranks
def _memory_protocol_worker(rank: int, world: int, state: str, out: str, port: int) -> None:
    """Loads a 1-process state, shares its memory out, adds rank-specific items, gathers, saves."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        updater = make_updater("derpp", Path(state), Path(out) / "unused")
        part = shard_memory(updater.learner.memory, rank, world)
        inputs, targets, metadata = part.raw_items()
        save_file({"inputs": inputs, "targets": targets, **{f"metadata.{k}": v for k, v in metadata.items()}},
                  f"{out}/rank{rank}_loaded.safetensors")
        g = torch.Generator().manual_seed(rank)
        new = torch.rand(40, 1, 8, 8, generator=g) + 10 * (rank + 1)  # distinct from the digits and per rank
        part.add(new, torch.randint(0, 10, (40,), generator=g), {"logits": torch.randn(40, 10, generator=g)})
        inputs, targets, metadata = part.raw_items()
        save_file({"inputs": inputs, "targets": targets, "seen": torch.tensor([part.seen]),
                   **{f"metadata.{k}": v for k, v in metadata.items()}}, f"{out}/rank{rank}_after.safetensors")
        updater.learner.memory = gather_memory(part, updater.learner.memory.memory_size)
        if rank == 0:
            updater.save_state(Path(out) / "gathered")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_memory_shared_to_two_ranks_and_gathered_back(single_first: dict[str, Path], tmp_path: Path) -> None:
    state = single_first["derpp"]
    mp.start_processes(_memory_protocol_worker, args=(2, str(state), str(tmp_path), _free_port()), nprocs=2,
                       start_method=_start_method())
    saved = StateFolder(state)
    # 1 process -> 2 ranks: the two ranks hold exactly the saved items, with their logits
    loaded = [load_file(tmp_path / f"rank{r}_loaded.safetensors") for r in range(2)]
    assert sorted(memory_rows(loaded[0]) + memory_rows(loaded[1])) == memory_rows(saved.tensors("memory.safetensors"))
    assert [len(t["inputs"]) for t in loaded] == [30, 30]
    # 2 ranks -> 1 process: the state rank 0 wrote loads in one process with every rank's items
    after = [load_file(tmp_path / f"rank{r}_after.safetensors") for r in range(2)]
    single = make_updater("derpp", tmp_path / "gathered", tmp_path / "unused")
    assert memory_rows(single.learner.memory) == sorted(
        memory_rows({k: v for k, v in after[0].items() if k != "seen"})
        + memory_rows({k: v for k, v in after[1].items() if k != "seen"})
    )
    assert single.learner.memory.seen == int(after[0]["seen"]) + int(after[1]["seen"]) == 540 + 80
    assert schema(tmp_path / "gathered") == schema(state)


# --------------------------------------------------------------------------- a worker dies
class FailsOnRank1(Dataset):
    """A dataset (not tensor-backed, so it is read item by item) whose reads fail on rank 1."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if os.environ.get("RANK") == "1":
            raise OSError("simulated failure of worker 1")
        return self.base[i]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_failing_worker_fails_the_update_and_writes_nothing(
    digits_tasks: list, single_first: dict[str, Path], tmp_path: Path
) -> None:
    before = _digest(single_first["er"])
    updater = make_updater("er", single_first["er"], tmp_path / "out", devices=2)
    with pytest.raises(DistributedUpdateError, match="simulated failure of worker 1"):
        updater.update(FailsOnRank1(digits_tasks[1][0]))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != ".out.lock"] == []  # no temporary folder left
    assert _digest(single_first["er"]) == before  # the input state is untouched
    assert updater.learner.updates_done == 1  # the parent's updater is as it was


# --------------------------------------------------------------------------- a launched job (torchrun)
def _launched_worker(rank: int, world: int, state: str, out: str, port: int, train: Dataset) -> None:
    """What each process of ``torchrun --nproc_per_node 2`` does: its own updater, then ``update``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as the spawned workers do
    make_updater("er", Path(state), Path(out), devices=2).update(train)
    dist.destroy_process_group()


def test_a_launched_job_gives_the_same_state_as_spawned_workers(
    digits_tasks: list, single_first: dict[str, Path], tmp_path: Path
) -> None:
    train = digits_tasks[1][0]
    mp.start_processes(_launched_worker, args=(2, str(single_first["er"]), str(tmp_path / "launched"), _free_port(),
                                               train), nprocs=2, start_method=_start_method())
    update("er", single_first["er"], tmp_path / "spawned", train, devices=2)
    launched, spawned = StateFolder(tmp_path / "launched"), StateFolder(tmp_path / "spawned")
    for name in ("model.safetensors", "learner.safetensors", "memory.safetensors"):
        a, b = launched.tensors(name), spawned.tensors(name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert launched.json("memory.json") == spawned.json("memory.json")


def test_unpicklable_parts_are_named_before_workers_start(single_first: dict[str, Path], tmp_path: Path) -> None:
    cls, _ = METHODS["er"]
    updater = cls(MultiLayerPerceptron(64, 10, [64]), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                  input_state_folder=single_first["er"], output_state_folder=tmp_path / "out", devices=2, **OPTIONS)
    with pytest.raises(TypeError, match=r"picklable optimizer.*torchrun"):
        updater.update(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    assert not (tmp_path / "out").exists()


def test_two_ranks_train_the_task_id_given_to_update(digits_tasks: list, tmp_path: Path) -> None:
    """``task_id`` reaches the ranks as the task id (not in another argument's place): the state they
    write records it and the served model has its head; with no validation data nothing else is needed."""
    updater = make_updater("er", None, tmp_path / "s1", devices=2)
    model = updater.update(digits_tasks[0][0], task_id="t7")
    state = StateFolder(tmp_path / "s1")
    assert state.manifest["task_ids_seen"] == ["t7"] and updater.learner.task_ids_seen == ["t7"]
    assert "t7" in state.manifest["model"]["task_ids"] and "t7" in model.task_ids
