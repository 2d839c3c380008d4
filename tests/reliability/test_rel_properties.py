"""Property-based tests (hypothesis) of the reservoir memory and of state save/load.

Items are stored with their id as input (``[id, -id]``), label ``id % 7`` and logits ``[id] * 3``,
so that every stored row can be traced back to the item offered. For any memory size and any
sequence of batch sizes: the memory never exceeds its size, holds exactly ``min(seen, size)``
items, only items offered, each at most once, rows never mixed; its slots are those of the
sequential Algorithm R fed with the same random draws; and it round-trips exactly (contents,
and every later add and sample) through ``state_dict``/``load_state_dict`` and through a
written state folder. Nested optimizer-like values round-trip through ``flatten_tree`` and a
state folder. Example counts are modest and derandomized, so the suite is fast and repeatable.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retain.checkpoint import flatten_tree, unflatten_tree
from retain.memory import ReservoirMemory
from retain.state import StateFolder, write_state

SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
memory_sizes = st.integers(min_value=0, max_value=25)
batch_sizes = st.lists(st.integers(min_value=0, max_value=30), max_size=12)
seeds = st.integers(min_value=0, max_value=2**16)
MANIFEST = {
    "retain_version": "test",
    "method": "PropertyTest",
    "model": {"class": "none", "hyperparameters": {}, "task_ids": []},
    "method_options": {},
    "options": {},
    "updates_done": 0,
    "task_ids_seen": [],
}


def _batch(first_id: int, n: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.arange(first_id, first_id + n, dtype=torch.float32)
    return torch.stack([ids, -ids], dim=1), ids.long() % 7, {"logits": ids[:, None].repeat(1, 3)}


def _feed(memory: ReservoirMemory, batches: list[int], first_id: int = 0) -> int:
    for n in batches:
        memory.add(*_batch(first_id, n))
        first_id += n
    return first_id


def _stored_ids(memory: ReservoirMemory) -> list[int]:
    if len(memory) == 0:
        return []
    inputs, targets, metadata = memory.raw_items()
    ids = inputs[:, 0].long()
    assert torch.equal(inputs[:, 1], -inputs[:, 0]), "an input row was mixed"
    assert torch.equal(targets, ids % 7), "a label does not belong to its input"
    assert torch.equal(metadata["logits"], inputs[:, :1].repeat(1, 3)), "stored logits do not belong to their input"
    return ids.tolist()


def _algorithm_r(memory_size: int, batches: list[int], seed: int) -> list[int]:
    """Vitter's Algorithm R one item at a time, with the memory's draws (one float64 per item of
    every batch that does not fit entirely in the free slots)."""
    generator = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    seen = 0
    for n in batches:
        if memory_size == 0 or n == 0:
            seen += n
            continue
        draws = None if seen + n <= memory_size else torch.rand(n, dtype=torch.float64, generator=generator).tolist()
        for j in range(n):
            t = seen + j + 1
            if t <= memory_size:
                slots.append(t - 1)
            else:
                assert draws is not None
                slot = math.floor(draws[j] * t)
                if slot < memory_size:
                    slots[slot] = t - 1
        seen += n
    return slots


def _same_memory(a: ReservoirMemory, b: ReservoirMemory) -> None:
    assert a.seen == b.seen and len(a) == len(b)
    assert _stored_ids(a) == _stored_ids(b)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@SETTINGS
@given(memory_size=memory_sizes, batches=batch_sizes, seed=seeds)
def test_memory_holds_a_reservoir_sample_of_the_items_seen(memory_size: int, batches: list[int], seed: int) -> None:
    memory = ReservoirMemory(memory_size, seed=seed)
    seen = 0
    for n in batches:
        seen = _feed(memory, [n], seen)
        ids = _stored_ids(memory)
        assert len(memory) == len(ids) == min(seen, memory_size) <= memory_size
        assert all(0 <= i < seen for i in ids), "the memory holds an item never offered"
        assert len(set(ids)) == len(ids), "an item is stored twice"
    assert _stored_ids(memory) == _algorithm_r(memory_size, batches, seed)


@SETTINGS
@given(
    memory_size=memory_sizes,
    before=batch_sizes,
    after=batch_sizes,
    sample_size=st.integers(min_value=0, max_value=30),
    seed=seeds,
)
def test_memory_round_trips_exactly_through_state_dict_and_a_state_folder(
    memory_size: int, before: list[int], after: list[int], sample_size: int, seed: int
) -> None:
    original = ReservoirMemory(memory_size, seed=seed)
    next_id = _feed(original, before)
    meta, tensors = original.state_dict()
    restored = ReservoirMemory(memory_size, seed=seed + 1)  # other seed: the state must carry the generator
    restored.load_state_dict(meta, tensors)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_state(Path(tmp) / "state", MANIFEST, {"memory.json": meta}, {"memory.safetensors": tensors})
        state = StateFolder(folder)
        from_folder = ReservoirMemory(memory_size, seed=seed + 2)  # validates the state as it loads
        from_folder.load_state_dict(state.json("memory.json"), state.tensors("memory.safetensors"), num_classes=7)
    copies = [restored, from_folder]
    for memory in copies:
        _same_memory(original, memory)
    for n in after:  # continuing: every add and every sample is the same
        for memory in [original, *copies]:
            _feed(memory, [n], next_id)
        next_id += n
        samples = [m.sample(sample_size) for m in [original, *copies]]
        if samples[0] is None:
            assert all(s is None for s in samples)
            continue
        indices = samples[0].indices.tolist()
        assert len(indices) == len(set(indices)) == min(sample_size, len(original)), "sample not without replacement"
        for other in samples[1:]:
            assert other is not None and torch.equal(other.indices, samples[0].indices)
            assert torch.equal(other.inputs, samples[0].inputs)
    for memory in copies:
        _same_memory(original, memory)


# ---------------------------------------------------------------------------------------- nested values
tensors_strategy = st.one_of(
    st.lists(st.floats(width=32, allow_nan=False), max_size=4).map(lambda v: torch.tensor(v, dtype=torch.float32)),
    st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=4).map(torch.tensor),
    st.integers(0, 255).map(lambda v: torch.full((2, 2), v, dtype=torch.uint8)),
)
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(), st.text(max_size=8), tensors_strategy
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.integers(-5, 5), st.text(max_size=5)), children, max_size=4),
    ),
    max_leaves=20,
)


def _identical(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_identical(a[k], b[k]) for k in a)
    return a == b


@SETTINGS
@given(tree=trees)
def test_nested_values_round_trip_through_flatten_tree_and_a_state_folder(tree: Any) -> None:
    data, tensors = flatten_tree(tree)
    assert _identical(unflatten_tree(data, tensors), tree)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_state(Path(tmp) / "s", MANIFEST, {"tree.json": data}, {"tree.safetensors": tensors})
        state = StateFolder(folder)
        assert _identical(unflatten_tree(state.json("tree.json"), state.tensors("tree.safetensors")), tree)
