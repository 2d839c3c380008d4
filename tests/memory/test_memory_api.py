"""ReservoirMemory's smaller public paths, each pinned by exact values: ``get`` of given slots, an
empty batch, dtype casts on write, capacities after a load, ``load_buffers``' choices, the columns'
spare rows, and the pad value checks."""

from __future__ import annotations

import pytest
import torch

from retain.memory import MemoryBatch, ReservoirMemory


def _ids_memory(memory_size: int = 8, items: int = 6, **kwargs: object) -> ReservoirMemory:
    memory = ReservoirMemory(memory_size, seed=0, **kwargs)  # type: ignore[arg-type]
    ids = torch.arange(items)
    memory.add(ids.float()[:, None] * 10, ids % 3, {"logits": ids.float()[:, None].repeat(1, 2)})
    return memory


def test_get_returns_the_items_at_the_given_slots_with_the_transforms() -> None:
    memory = _ids_memory(transform=lambda x: x + 1, target_transform=lambda y: y * 100)
    batch = memory.get(torch.tensor([4, 0, 4]))
    assert isinstance(batch, MemoryBatch) and len(batch) == 3
    assert batch.indices.tolist() == [4, 0, 4]
    assert batch.inputs[:, 0].tolist() == [41.0, 1.0, 41.0]
    assert batch.targets.tolist() == [100, 0, 100]
    assert batch.metadata["logits"].tolist() == [[4.0, 4.0], [0.0, 0.0], [4.0, 4.0]]
    with pytest.raises(ValueError, match=r"^the memory is empty$"):
        ReservoirMemory(3).get(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^the memory is empty$"):
        ReservoirMemory(3).raw_items()


def test_an_empty_batch_counts_nothing_and_allocates_nothing() -> None:
    memory = ReservoirMemory(4, seed=0)
    slots = memory.add(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert slots.dtype == torch.long and slots.shape == (0,)
    assert memory.seen == 0 and memory.structure is None and memory.capacity == 0 and memory.inputs is None
    memory.add(torch.ones(2, 5), torch.ones(2, dtype=torch.long))  # the first real batch sets the shape
    assert memory.raw_items()[0].shape == (2, 5)
    assert memory.add(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).tolist() == [] and memory.seen == 2


def test_targets_and_metadata_are_stored_in_the_columns_dtypes() -> None:
    memory = ReservoirMemory(5, seed=0)
    memory.add(torch.zeros(2, 1), torch.tensor([1, 2], dtype=torch.int32), {"logits": torch.zeros(2, 1)})
    precise = torch.tensor([[1 / 3], [2 / 3]], dtype=torch.float64)
    memory.add(torch.zeros(2, 1), torch.tensor([3, 4], dtype=torch.uint8), {"logits": precise})
    _, targets, metadata = memory.raw_items()
    assert targets.dtype == torch.int64 and targets.tolist() == [1, 2, 3, 4]
    assert metadata["logits"].dtype == torch.float32
    assert metadata["logits"][2:].tolist() == precise.float().tolist()
    memory.update_metadata("logits", torch.tensor([0]), torch.tensor([[1 / 7]], dtype=torch.float64), gamma=0.5)
    assert memory.raw_items()[2]["logits"][0, 0].item() == torch.tensor(0.5 / 7, dtype=torch.float32).item()


def test_a_target_that_is_not_a_tensor_is_refused_naming_its_type() -> None:
    with pytest.raises(ValueError, match=r"targets must be a 1-D tensor of class indices, got shape list"):
        ReservoirMemory(3).add(torch.zeros(2, 1), [0, 1])  # type: ignore[arg-type]


def test_a_refused_batch_leaves_items_and_generator_as_they_were() -> None:
    memory = _ids_memory(memory_size=4, items=6)
    before = [t.clone() for t in memory.raw_items()[:2]], memory.generator.get_state().clone(), memory.seen
    with pytest.raises(ValueError, match=r"memory metadata columns are \['logits'\], got \[\]"):
        memory.add(torch.ones(3, 1), torch.zeros(3, dtype=torch.long))
    assert torch.equal(memory.raw_items()[0], before[0][0]) and torch.equal(memory.raw_items()[1], before[0][1])
    assert torch.equal(memory.generator.get_state(), before[1]) and memory.seen == before[2]


@pytest.mark.parametrize("items", [128, 129, 200, 37])
def test_a_loaded_memory_has_the_capacity_of_the_one_saved(items: int) -> None:
    """Capacity 128 for 128 items (64 doubled), 129 = M + 1 once a spare row is needed."""
    original = ReservoirMemory(128, seed=1)
    original.add(torch.arange(items).float()[:, None], torch.zeros(items, dtype=torch.long))
    restored = ReservoirMemory(128)
    restored.load_state_dict(*original.state_dict())
    assert restored.capacity == original.capacity == {128: 128, 129: 129, 200: 129, 37: 64}[items]
    assert torch.equal(restored.raw_items()[0], original.raw_items()[0])


def test_spare_rows_of_a_loaded_column_hold_the_leaf_pad_value() -> None:
    original = ReservoirMemory(20, seed=0, pad_values={"ids": -1})
    original.add({"ids": torch.arange(6).view(3, 2)}, torch.zeros(3, dtype=torch.long))
    meta, tensors = original.state_dict()
    plain = ReservoirMemory(20, pad_values={"ids": -1})
    plain.load_state_dict(meta, tensors)
    buffered = ReservoirMemory(20, pad_values={"ids": -1})
    header = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    buffers = buffered.load_buffers(meta, header)
    for key, value in tensors.items():
        if key in buffers:
            buffers[key].copy_(value)
    buffered.load_state_dict(meta, {**tensors, **buffers})
    for memory in (plain, buffered):
        column = memory.columns["ids"]
        assert column.shape == (21, 2) and torch.equal(column, original.columns["ids"])
        assert column[3:].eq(-1).all() and memory.targets is not None and memory.targets[3:].eq(0).all()
    assert buffered.columns["ids"].data_ptr() == buffers["inputs.ids"].data_ptr()


def test_buffers_prepared_but_not_read_into_are_not_adopted() -> None:
    """A state read into other tensors than the buffers load_buffers gave: the values loaded win."""
    original = _ids_memory(memory_size=8, items=6)
    meta, tensors = original.state_dict()
    memory = ReservoirMemory(8)
    buffers = memory.load_buffers(meta, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    assert set(buffers) == {"inputs", "targets", "metadata.logits"}
    memory.load_state_dict(meta, tensors)  # the buffers were never filled
    assert memory.columns[""].data_ptr() != buffers["inputs"].data_ptr()
    for a, b in zip(memory.raw_items()[:2], original.raw_items()[:2], strict=True):
        assert torch.equal(a, b)
    assert memory._prepared == {}  # dropped by the load


@pytest.mark.parametrize(
    "meta",
    [{"seen": 0}, {"seen": -1}, {"seen": True}, {"seen": "6"}, {}, ["seen"]],
    ids=["empty", "negative", "bool", "str", "missing", "not-a-dict"],
)
def test_load_buffers_offers_nothing_for_an_empty_or_malformed_description(meta: object) -> None:
    memory = ReservoirMemory(8)
    assert memory.load_buffers(meta, {"inputs": (torch.float32, (6, 1))}) == {}
    assert memory._prepared == {}


def test_load_buffers_skips_the_generator_and_tensors_of_another_row_count() -> None:
    memory = ReservoirMemory(128, pad_values={"ids": 7})
    header = {
        "generator_state": (torch.uint8, (6,)), "inputs.ids": (torch.int64, (6, 3)),
        "inputs.x": (torch.float32, (5, 1)), "targets": (torch.int64, (6,)), "metadata.s": (torch.float32, ()),
    }  # fmt: skip
    assert memory.load_buffers({"seen": 200}, header) == {}  # 200 seen: 128 rows expected
    buffers = memory.load_buffers({"seen": 6}, header)
    assert sorted(buffers) == ["inputs.ids", "targets"]
    assert buffers["inputs.ids"].shape == (6, 3) and buffers["inputs.ids"].dtype == torch.int64
    assert memory._prepared["inputs.ids"].shape == (64, 3) and memory._prepared["inputs.ids"].eq(7).all()
    assert memory._prepared["targets"].shape == (64,) and memory._prepared["targets"].eq(0).all()
    for seen, rows in [(128, 128), (129, 129), (200, 129)]:
        full = memory.load_buffers({"seen": seen}, {"inputs": (torch.float32, (128, 2))})
        assert full["inputs"].shape == (128, 2) and memory._prepared["inputs"].shape == (rows, 2), seen


@pytest.mark.parametrize(
    "pads, message",
    [
        ([("x", 1)], r"^pad_values must map input leaf paths to numbers, got list$"),
        ({1: 0}, r"^pad_values: leaf path 1 must be a string$"),
        ({"x": float("nan")}, r"pad value of input leaf 'x' must be a finite number, got nan"),
        ({"x": float("inf")}, r"pad value of input leaf 'x' must be a finite number, got inf"),
        ({"": "0"}, r"pad value of inputs must be a finite number, got '0'"),
    ],
)
def test_bad_pad_values_are_refused(pads: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReservoirMemory(3, pad_values=pads)  # type: ignore[arg-type]


def test_pad_values_that_fit_their_leaf_are_used() -> None:
    """A whole float pads an integer leaf; any number pads a float or a bool leaf."""
    memory = ReservoirMemory(4, pad_values={"ids": 2.0, "mask": 0.5, "x": 0.25})
    first = {"ids": torch.ones(1, 1, dtype=torch.long), "mask": torch.ones(1, 1, dtype=torch.bool),
             "x": torch.ones(1, 1)}  # fmt: skip
    memory.add(first, torch.zeros(1, dtype=torch.long))
    longer = {"ids": torch.ones(1, 3, dtype=torch.long), "mask": torch.ones(1, 3, dtype=torch.bool),
              "x": torch.ones(1, 3)}  # fmt: skip
    memory.add(longer, torch.zeros(1, dtype=torch.long))
    inputs = memory.raw_items()[0]
    assert inputs["ids"].tolist() == [[1, 2, 2], [1, 1, 1]]
    assert inputs["x"].tolist() == [[1.0, 0.25, 0.25], [1.0, 1.0, 1.0]]
    assert inputs["mask"].tolist() == [[True, True, True], [True, True, True]]  # 0.5 as a bool is True
    with pytest.raises(ValueError, match=r"pad value 2.5 of input leaf 'ids' does not fit its dtype torch.int32"):
        ids = {"ids": torch.ones(1, 1, dtype=torch.int32)}
        ReservoirMemory(4, pad_values={"ids": 2.5}).add(ids, torch.zeros(1, dtype=torch.long))


def test_a_sample_larger_than_the_memory_draws_every_item_once() -> None:
    memory = _ids_memory(memory_size=8, items=5)
    batch = memory.sample(100)
    assert batch is not None and sorted(batch.indices.tolist()) == [0, 1, 2, 3, 4]
    assert sorted(batch.inputs[:, 0].tolist()) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert memory.sample(-1) is None and len(memory) == 5


def test_update_metadata_with_gamma_one_keeps_and_with_gamma_zero_replaces_even_non_finite_values() -> None:
    memory = _ids_memory(memory_size=8, items=4)
    memory.set_metadata("logits", torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [5.0, 6.0], [7.0, 8.0]]))
    memory.update_metadata("logits", torch.tensor([0, 2]), torch.full((2, 2), 100.0), gamma=1.0)
    assert memory.raw_items()[2]["logits"][[0, 2]].tolist() == [[1.0, 2.0], [5.0, 6.0]]
    memory.update_metadata("logits", torch.tensor([1]), torch.tensor([[3.0, 4.0]]), gamma=0.0)
    assert memory.raw_items()[2]["logits"][1].tolist() == [3.0, 4.0]  # not 0 * inf + 3 = nan


def test_empty_like_keeps_the_device_and_transforms_and_takes_the_seed_given() -> None:
    def transform(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    def target_transform(y: torch.Tensor) -> torch.Tensor:
        return y * 2

    memory = ReservoirMemory(9, seed=3, transform=transform, target_transform=target_transform)
    twin = memory.empty_like(seed=5)
    assert twin.memory_size == 9 and twin.device == memory.device
    assert twin.transform is transform and twin.target_transform is target_transform
    assert torch.equal(twin.generator.get_state(), ReservoirMemory(1, seed=5).generator.get_state())
    assert torch.equal(memory.empty_like().generator.get_state(), ReservoirMemory(1, seed=0).generator.get_state())
