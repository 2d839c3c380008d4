"""The collectives of a DDP update on a one-rank gloo group in this process (no worker processes):
the memory's byte-level all_gather and an update run as rank 0 of a launched job."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from retain import ExperienceReplayModelUpdater, MultiLayerPerceptron
from retain.memory import ReservoirMemory
from retain.state import StateFolder
from retain.updaters.distributed import DistributedUpdateError, gather_memory, in_launched_job


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gather_memory_sends_every_dtype_and_leaf_through_bytes(one_rank_group: None) -> None:
    memory = ReservoirMemory(5, seed=2, pad_values={"ids": -1})
    for start in range(0, 9, 3):
        ids = torch.arange(start, start + 3)
        inputs = {"ids": ids[:, None].repeat(1, 2), "x": (ids.double() / 3)[:, None], "m": (ids % 2 == 0)[:, None]}
        memory.add(inputs, ids % 4, {"logits": (ids.float() / 7)[:, None].repeat(1, 3)})
    gathered = gather_memory(memory, 5)
    assert gathered is not memory and gathered.seen == 9 and len(gathered) == 5
    for a, b in zip(gathered.raw_items()[:2], memory.raw_items()[:2], strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        else:
            assert torch.equal(a, b)
    assert torch.equal(gathered.raw_items()[2]["logits"], memory.raw_items()[2]["logits"])
    assert torch.equal(gathered.generator.get_state(), memory.generator.get_state())
    assert gathered.pad_values == {"ids": -1}


def test_gather_memory_of_an_empty_rank(one_rank_group: None) -> None:
    memory = ReservoirMemory(3, seed=1)
    memory.seen = 0
    gathered = gather_memory(memory, 3)
    assert len(gathered) == 0 and gathered.seen == 0
    assert torch.equal(gathered.generator.get_state(), memory.generator.get_state())


def test_an_update_as_the_only_rank_of_a_launched_job_writes_its_state(one_rank_group: None, tmp_path: Path) -> None:
    assert in_launched_job()
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g))
    updater = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
        functools.partial(torch.optim.SGD, lr=0.1), memory_size=10, batch_size=8, memory_batch_size=4,
        max_epochs=1, devices=2, output_state_folder=tmp_path / "out", seed=3,
    )  # fmt: skip
    model = updater.update(train, task_id="t1")
    assert model is not None
    state = StateFolder(tmp_path / "out")
    assert state.manifest["updates_done"] == 1 and state.manifest["task_ids_seen"] == ["t1"]
    memory = state.json("memory.json")
    assert memory["seen"] == 24 and memory["memory_size"] == 10  # one rank: every item once, no padding
    assert updater.learner.memory.seen == 24 and updater.learner.memory_batch_size == 4
    assert updater.learner.forward_model is updater.learner.model  # the DDP wrapper is dropped afterwards
    saved = state.tensors("memory.safetensors")
    assert torch.equal(saved["inputs"], updater.learner.memory.raw_items()[0])
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.slow  # two updates, about 5 s on 2 cores
def test_a_joint_update_shards_its_chunked_data_as_a_rank(one_rank_group: None, tmp_path: Path) -> None:
    """The joint baseline's chunk source is not a stream: a rank trains on its shard of every chunk."""
    from retain import JointModelUpdater

    g = torch.Generator().manual_seed(1)
    tasks = [TensorDataset(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(2)]
    first = JointModelUpdater(MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
                              functools.partial(torch.optim.SGD, lr=0.1), batch_size=4, max_epochs=1,
                              output_state_folder=tmp_path / "a", seed=0)  # fmt: skip
    dist.destroy_process_group()  # the first update on one device, outside the group
    try:
        first.update(tasks[0], task_id="t1")
    finally:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store2", rank=0, world_size=1)
    second = JointModelUpdater(
        MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
        functools.partial(torch.optim.SGD, lr=0.1), batch_size=4, max_epochs=1, devices=2,
        input_state_folder=tmp_path / "a", output_state_folder=tmp_path / "b", seed=0,
    )  # fmt: skip
    second.update(tasks[1], task_id="t2")
    state = StateFolder(tmp_path / "b")
    assert state.manifest["task_ids_seen"] == ["t1", "t2"] and state.has("chunk_000001.safetensors")


def test_rank_0_of_a_launched_job_takes_the_output_lock(one_rank_group: None, tmp_path: Path) -> None:
    """run_rank(take_lock=True) holds the output lock on rank 0: a lock held elsewhere fails every rank."""
    from retain.state import OutputLock
    from retain.updaters.distributed import DistributedUpdateError, run_rank

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    updater = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
        functools.partial(torch.optim.SGD, lr=0.1), memory_size=4, batch_size=4, max_epochs=1, devices=2,
        output_state_folder=tmp_path / "out",
    )  # fmt: skip
    updater.release_output_lock()
    held = r"^StateLockedError: another update is writing the state"
    with OutputLock(tmp_path / "out"), pytest.raises(DistributedUpdateError, match=held):  # another writer took it
        run_rank(updater, train, None, None, None, "t1", take_lock=True)
    assert not (tmp_path / "out").exists()


def _er_updater(tmp_path: Path, **kwargs: object) -> ExperienceReplayModelUpdater:
    return ExperienceReplayModelUpdater(
        MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
        functools.partial(torch.optim.SGD, lr=0.1), memory_size=4, batch_size=4, max_epochs=1, devices=2,
        output_state_folder=tmp_path / "out", **kwargs,
    )  # fmt: skip


def _train(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_a_state_rank_0_cannot_write_fails_the_update_on_every_rank(one_rank_group: None, tmp_path: Path) -> None:
    updater = _er_updater(tmp_path)
    (tmp_path / "out").write_text("a user's file appeared")
    with pytest.raises(DistributedUpdateError, match=r"^rank 0 could not write .*out: StateError: refusing to replace"):
        updater.update(_train(), task_id="t1")
    assert (tmp_path / "out").read_text() == "a user's file appeared"


def test_a_stream_cannot_be_sharded_over_ranks(one_rank_group: None, tmp_path: Path) -> None:
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from _train()

    with pytest.raises(ValueError, match=r"an IterableDataset cannot be sharded over devices; use devices=1"):
        _er_updater(tmp_path).update(Stream(), task_id="t1")
    assert not (tmp_path / "out").exists()


def test_shutdown_process_group_ends_the_group_and_says_whether_there_was_one(tmp_path: Path) -> None:
    from retain.updaters.distributed import shutdown_process_group

    assert shutdown_process_group() is False
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        started = time.monotonic()
        assert shutdown_process_group(timeout_s=10.0) is True
        assert time.monotonic() - started < 5.0  # every rank (the one) has destroyed its group: no wait
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ensure_process_group_starts_gloo_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from retain.updaters.distributed import ensure_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(name, value)
    ensure_process_group(torch.device("cpu"))
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        ensure_process_group(torch.device("cpu"))  # already initialised: left as it is
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_a_rank_replays_its_share_of_the_memory_batch_and_trains_its_share_of_the_batch(
    one_rank_group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rank of W = 1: ceil(b / 1) = b of both batches per step, every item of the data once."""
    drawn: list[int] = []
    real_sample = ReservoirMemory.sample

    def sample(self: ReservoirMemory, batch_size: int):  # type: ignore[no-untyped-def]
        drawn.append(batch_size)
        return real_sample(self, batch_size)

    monkeypatch.setattr(ReservoirMemory, "sample", sample)
    updater = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(4, 3, (8,)), torch.nn.functional.cross_entropy,
        functools.partial(torch.optim.SGD, lr=0.1), memory_size=6, batch_size=4, memory_batch_size=3,
        max_epochs=1, devices=2, output_state_folder=tmp_path / "out",
    )  # fmt: skip
    updater.update(_train(12), task_id="t1")
    assert drawn and set(drawn) == {3}, drawn
    assert updater.last_fit is not None
    assert updater.learner.memory.seen == 12 and updater.learner.memory_batch_size == 3


class _Records(torch.utils.data.Dataset):
    """Items as records that only the caller's collate function turns into (inputs, targets)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"features": x, "label": y}


def _collate_records(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([r["features"] for r in items]), torch.stack([r["label"] for r in items])


def test_a_rank_trains_with_the_train_collate_function_it_was_given(one_rank_group: None, tmp_path: Path) -> None:
    calls: list[int] = []

    def collate(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(items))
        return _collate_records(items)

    updater = _er_updater(tmp_path)
    updater.update(_Records(_train(8)), train_dataset_collate_fn=collate, task_id="t1")
    assert calls and sum(calls) >= 8  # every training item went through it
    assert StateFolder(tmp_path / "out").json("memory.json")["seen"] == 8


def test_a_rank_trains_with_deterministic_algorithms_when_asked(
    one_rank_group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deterministic_trainer=True`` reaches a rank's training steps (and is undone afterwards)."""
    seen: list[bool] = []
    real_forward = MultiLayerPerceptron.forward

    def forward(self: MultiLayerPerceptron, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiLayerPerceptron, "forward", forward)
    before = torch.are_deterministic_algorithms_enabled()
    _er_updater(tmp_path, deterministic_trainer=True).update(_train(), task_id="t1")
    assert seen and all(seen), seen
    assert torch.are_deterministic_algorithms_enabled() == before
    seen.clear()
    _er_updater(tmp_path / "again").update(_train(), task_id="t1")
    assert seen and all(flag == before for flag in seen), seen  # off: the process's own setting


def test_shutdown_counts_this_rank_in_the_groups_store_before_leaving(tmp_path: Path) -> None:
    """Each rank adds 1 to ``retain_group_destroyed`` in the store and waits for all W: the
    count the other ranks wait on (with W = 1 the wait ends at once, so the count is what shows)."""
    from retain.updaters.distributed import shutdown_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    store = dist.distributed_c10d._get_default_store()  # the store shutdown_process_group counts in
    try:
        assert shutdown_process_group(timeout_s=10.0) is True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert store.add("retain_group_destroyed", 0) == 1
