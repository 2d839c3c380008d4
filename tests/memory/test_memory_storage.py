"""ReservoirMemory storage: geometric growth that changes no bit and no draw, nested inputs (one
column per leaf, still exact and uniform), variable-length leaves padded per leaf, host memory."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from scipy import stats

from retain import nested
from retain.memory import INITIAL_ROWS, ReservoirMemory

SIZES = [5, 17, 30, 1, 64, 9, 33, 128, 2, 40]


def _feed(memory: ReservoirMemory, sizes: list[int] = SIZES) -> list[int]:
    start, slots = 0, []
    for size in sizes:
        ids = torch.arange(start, start + size)
        start += size
        inputs = torch.stack([ids.float(), -ids.float(), ids.float() * 0.5], 1)
        logits = ids.float().unsqueeze(1).repeat(1, 2) * 0.25
        slots += memory.add(inputs, ids % 7, {"logits": logits}).tolist()
    return slots


def _sha(values: object) -> str:
    return hashlib.sha256(str(values).encode()).hexdigest()


def test_growth_reproduces_the_preallocated_memory_of_the_previous_release() -> None:
    """Recorded with the preallocating ReservoirMemory (before growth): same slots, items and RNG."""
    memory = ReservoirMemory(50, seed=7)
    slots = _feed(memory)
    ids = memory.raw_items()[0][:, 0].long().tolist()
    assert ids == [
        222, 145, 228, 59, 53, 178, 6, 201, 207, 9, 265, 67, 150, 314, 121, 74, 16, 301, 242, 205, 241, 61, 22,
        149, 69, 171, 189, 194, 52, 96, 114, 259, 92, 318, 123, 127, 36, 236, 38, 288, 185, 89, 158, 313, 271,
        143, 116, 90, 152, 51,
    ]  # fmt: skip
    assert _sha(slots) == "c1215e7b4c87ab585809e4e725056fa4c8690f32b42e2ca7cbbb647b916e9ca4"
    assert hashlib.sha256(bytes(memory.generator.get_state().tolist())).hexdigest() == (
        "27babfbde5d6702508a1cf7dd975c5b2f517e757026af2d8c2d686b073a6178f"
    )


@pytest.mark.parametrize("memory_size", [1, 50, 300, 1000])
def test_growing_and_preallocated_memories_are_bit_identical(memory_size: int) -> None:
    grown, fixed = ReservoirMemory(memory_size, seed=3), ReservoirMemory(memory_size, seed=3, preallocate=True)
    capacities = []
    start = 0
    for size in SIZES * 3:
        ids = torch.arange(start, start + size)
        start += size
        args = (torch.stack([ids.float().sin(), ids.float()], 1), ids % 5, {"logits": ids.float().cos().unsqueeze(1)})
        assert torch.equal(grown.add(*args), fixed.add(*args))
        a, b = grown.sample(8), fixed.sample(8)
        assert a is not None and b is not None and torch.equal(a.indices, b.indices)
        capacities.append(grown.capacity)
        assert fixed.capacity == memory_size + 1
        assert len(grown) <= grown.capacity <= max(2 * len(grown) + 1, min(INITIAL_ROWS, memory_size + 1))
    ga, fa = grown.state_dict(), fixed.state_dict()
    assert ga[0] == fa[0] and ga[1].keys() == fa[1].keys()
    assert save_safetensors(ga[1]) == save_safetensors(fa[1])  # the same state bytes
    assert capacities == sorted(capacities) and capacities[-1] == memory_size + 1


def test_storage_grows_with_the_items_held_not_the_memory_size() -> None:
    memory = ReservoirMemory(200_000, seed=0)
    memory.add(torch.zeros(1000, 3, 32, 32), torch.zeros(1000, dtype=torch.long))
    assert memory.capacity == 1024
    assert memory.columns[""].shape == (1024, 3, 32, 32)


def _nested_batch(ids: torch.Tensor) -> dict:
    return {"image": ids.float().view(-1, 1, 1).expand(-1, 2, 2), "pair": (ids.clone(), -ids.unsqueeze(1))}


def test_nested_inputs_keep_one_column_per_leaf_and_items_whole() -> None:
    memory = ReservoirMemory(10, seed=1)
    for start in range(0, 60, 7):
        ids = torch.arange(start, start + 7)
        memory.add(_nested_batch(ids), ids % 3, {"logits": ids.float().unsqueeze(1)})
    assert sorted(memory.columns) == ["image", "pair.0", "pair.1"]
    inputs, targets, metadata = memory.raw_items()
    ids = inputs["pair"][0]
    assert isinstance(inputs["pair"], tuple) and len(set(ids.tolist())) == 10
    assert torch.equal(inputs["image"][:, 0, 0].long(), ids) and torch.equal(inputs["pair"][1][:, 0], -ids)
    assert torch.equal(targets, ids % 3) and torch.equal(metadata["logits"][:, 0].long(), ids)
    columns = memory.inputs  # every allocated row, in the stored structure
    assert isinstance(columns, dict) and isinstance(columns["pair"], tuple)
    assert torch.equal(columns["pair"][0][:10], ids) and columns["image"].shape[1:] == (2, 2)
    assert columns["image"].shape[0] == memory.capacity
    batch = memory.sample(4)
    assert batch is not None
    assert torch.equal(batch.inputs["pair"][0], ids[batch.indices])
    assert torch.equal(batch.inputs["image"], inputs["image"][batch.indices])
    with pytest.raises(ValueError, match="memory holds inputs structured as"):
        memory.add({"image": torch.zeros(2, 2, 2)}, torch.zeros(2, dtype=torch.long), {"logits": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match=r"input leaf 'pair\.0' of dtype torch.int64, got torch.float32"):
        bad = _nested_batch(torch.arange(2))
        bad["pair"] = (bad["pair"][0].float(), bad["pair"][1])
        memory.add(bad, torch.zeros(2, dtype=torch.long), {"logits": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match=r"leaf 'pair\.1' has 3 rows, leaf 'image' has 2"):
        bad = _nested_batch(torch.arange(2))
        bad["pair"] = (bad["pair"][0], torch.zeros(3, 1, dtype=torch.long))
        memory.add(bad, torch.zeros(2, dtype=torch.long), {"logits": torch.zeros(2, 1)})


def test_reservoir_inclusion_stays_uniform_with_nested_inputs() -> None:
    """As tests/core's chi-square inclusion test, with dict-of-tuple items of random batch sizes."""
    memory_size, stream, runs = 10, 40, 3000
    rng = np.random.default_rng(99)
    counts = np.zeros(stream)
    ids = torch.arange(stream)
    for run in range(runs):
        memory = ReservoirMemory(memory_size, seed=run)
        start = 0
        while start < stream:
            size = min(int(rng.integers(1, 18)), stream - start)
            memory.add(_nested_batch(ids[start : start + size]), ids[start : start + size] % 2)
            start += size
        kept = memory.raw_items()[0]["pair"][0].numpy()
        assert len(set(kept.tolist())) == memory_size
        counts[kept] += 1
    p = memory_size / stream
    expected = runs * p
    statistic = (stream - 1) / stream * float(((counts - expected) ** 2).sum()) / (expected * (1 - p))
    assert stats.chi2.sf(statistic, df=stream - 1) > 1e-3


def _text_batch(lengths: list[int], first_id: int) -> dict:
    """A batch padded to its longest item: ids (pad -1) and a 0/1 attention mask."""
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), -1, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = first_id + i
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_variable_length_leaves_grow_their_column_and_pad_with_the_leaf_value() -> None:
    memory = ReservoirMemory(6, seed=0, pad_values={"input_ids": -1})
    memory.add(_text_batch([2, 3], 0), torch.tensor([0, 1]))
    assert memory.columns["input_ids"].shape[1] == 3
    memory.add(_text_batch([5, 1], 10), torch.tensor([2, 3]))  # longer: the column grows to 5
    memory.add(_text_batch([1, 2], 20), torch.tensor([4, 5]))  # shorter: padded on write
    inputs, _, _ = memory.raw_items()
    assert inputs["input_ids"].tolist() == [
        [0, 0, -1, -1, -1], [1, 1, 1, -1, -1], [10, 10, 10, 10, 10], [11, -1, -1, -1, -1],
        [20, -1, -1, -1, -1], [21, 21, -1, -1, -1],
    ]  # fmt: skip
    assert torch.equal(inputs["attention_mask"], (inputs["input_ids"] >= 0).long())  # mask padded with 0
    # a replayed batch joins a new (shorter) batch padded consistently, leaf by leaf
    replayed = memory.sample(3)
    assert replayed is not None
    new = _text_batch([2, 1], 30)
    joined = nested.cat([new, replayed.inputs], memory.pad_values)
    assert joined["input_ids"].shape == (5, 5)
    assert joined["input_ids"][:2].tolist() == [[30, 30, -1, -1, -1], [31, -1, -1, -1, -1]]
    assert torch.equal(joined["attention_mask"], (joined["input_ids"] >= 0).long())
    # the state keeps the pad values and the structure: a reload continues exactly
    meta, tensors = memory.state_dict()
    assert meta["pad_values"] == {"input_ids": -1}
    assert meta["input_leaves"]["input_ids"] == {"dtype": "int64", "shape": [5]}
    restored = ReservoirMemory(6, seed=123, pad_values={"input_ids": -1})
    restored.load_state_dict(json.loads(json.dumps(meta)), load_safetensors(save_safetensors(tensors)))
    longer = _text_batch([7, 2, 3], 40)
    assert torch.equal(memory.add(longer, torch.tensor([0, 1, 2])), restored.add(longer, torch.tensor([0, 1, 2])))
    a, b = memory.raw_items()[0], restored.raw_items()[0]
    assert all(torch.equal(a[key], b[key]) for key in a) and a["input_ids"].shape[1] == 7
    with pytest.raises(ValueError, match=r"input leaf 'input_ids' was padded with -1, this memory pads it with 0"):
        ReservoirMemory(6).load_state_dict(meta, tensors)


def test_pad_values_are_checked() -> None:
    with pytest.raises(ValueError, match=r"pad value of input leaf 'x' must be a finite number, got True"):
        ReservoirMemory(3, pad_values={"x": True})
    memory = ReservoirMemory(3, pad_values={"ids": 0.5})
    with pytest.raises(ValueError, match=r"pad value 0.5 of input leaf 'ids' does not fit its dtype torch.int64"):
        memory.add({"ids": torch.zeros(2, 2, dtype=torch.long)}, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("mode", ["cpu", "pinned"])
def test_host_memory_mode_equals_device_mode_on_cpu(mode: str) -> None:
    """Same slots, samples, EMA refreshes and state bytes; the columns live on the host."""
    same, host = ReservoirMemory(40, seed=5), ReservoirMemory(40, seed=5, memory_device=mode)
    assert host.storage_device.type == "cpu" and host.memory_device == mode
    for start in range(0, 200, 13):
        ids = torch.arange(start, start + 13)
        args = (_nested_batch(ids), ids % 4, {"logits": ids.float().unsqueeze(1)})
        assert torch.equal(same.add(*args), host.add(*args))
        a, b = same.sample(6), host.sample(6)
        assert a is not None and b is not None
        assert torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.inputs["image"], b.inputs["image"])
        assert torch.equal(a.metadata["logits"], b.metadata["logits"])
        same.update_metadata("logits", a.indices, a.metadata["logits"] + 1, gamma=0.5)
        host.update_metadata("logits", b.indices, b.metadata["logits"] + 1, gamma=0.5)
    sa, ha = same.state_dict(), host.state_dict()
    assert sa[0] == ha[0] and save_safetensors(sa[1]) == save_safetensors(ha[1])


def test_unknown_memory_device_is_refused() -> None:
    with pytest.raises(ValueError, match="memory_device must be one of same, cpu, pinned, got 'gpu'"):
        ReservoirMemory(3, memory_device="gpu")


def test_state_dict_without_copy_shares_host_storage_but_default_copies() -> None:
    memory = ReservoirMemory(8, seed=0)
    memory.add(torch.ones(5, 2), torch.zeros(5, dtype=torch.long))
    views = memory.state_dict(copy=False)[1]
    copies = memory.state_dict()[1]
    assert views["inputs"].data_ptr() == memory.columns[""].data_ptr()
    assert copies["inputs"].data_ptr() != memory.columns[""].data_ptr()
    assert torch.equal(views["inputs"], copies["inputs"]) and views["inputs"].shape == (5, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_memory_feeds_the_gpu() -> None:
    device = torch.device("cuda")
    same = ReservoirMemory(300, device=device, seed=0)
    host = ReservoirMemory(300, device=device, seed=0, memory_device="pinned")
    assert host.storage_device.type == "cpu"
    for start in range(0, 1000, 50):
        ids = torch.arange(start, start + 50, device=device)
        same.add(ids.float().unsqueeze(1), ids % 3)
        host.add(ids.float().unsqueeze(1), ids % 3)
    assert host.columns[""].is_pinned()
    batch = host.sample(32)
    assert batch is not None and batch.inputs.device.type == "cuda" and batch.targets.device.type == "cuda"
    assert torch.equal(batch.inputs.cpu(), host.raw_items()[0][batch.indices])
    for memory in (same, host):  # CUDA and host generators draw differently: both hold 300 distinct items
        assert memory.raw_items()[0][:, 0].unique().numel() == 300


def test_set_metadata_follows_growth_and_is_a_no_op_on_an_empty_memory() -> None:
    memory = ReservoirMemory(300, seed=0)
    memory.set_metadata("logits", torch.zeros(0, 2))  # Repeated Distillation refreshing an empty memory
    assert memory.metadata == {}
    memory.add(torch.arange(10).float()[:, None], torch.zeros(10, dtype=torch.long), {"logits": torch.zeros(10, 2)})
    memory.set_metadata("logits", torch.arange(20).float().view(10, 2))
    assert memory.metadata["logits"].shape == (memory.capacity, 2) == (64, 2)
    memory.add(torch.zeros(100, 1), torch.zeros(100, dtype=torch.long), {"logits": torch.ones(100, 2)})
    assert memory.capacity == 128 and torch.equal(memory.raw_items()[2]["logits"][:10], torch.arange(20.0).view(10, 2))


def test_empty_like_keeps_the_settings() -> None:
    memory = ReservoirMemory(9, seed=3, memory_device="cpu", pad_values={"ids": -1}, preallocate=True)
    twin = memory.empty_like(4)
    assert (twin.memory_size, twin.memory_device, twin.pad_values, twin.preallocate) == (4, "cpu", {"ids": -1}, True)
    assert len(twin) == 0 and twin.pad_values is not memory.pad_values
