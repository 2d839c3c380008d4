"""retain.chunks' pieces with exact values: names and keys, own_contiguous, which chunks are linked,
a chunk written by another tool with unaligned tensors, ChunkedDataset's checks, indexing and item
size, and ChunkedBatchSource's batch count, first batch, subsets and order."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from retain.chunks import (
    ChunkedBatchSource,
    ChunkedDataset,
    chunk_files,
    chunk_keys,
    chunk_name,
    input_key,
    map_chunk,
    own_contiguous,
    written_file,
)
from retain.state import LinkedFile, file_identity

CPU = torch.device("cpu")


def test_chunk_names_and_tensor_keys() -> None:
    assert chunk_name(7) == "chunk_000007.safetensors" and chunk_name(123456) == "chunk_123456.safetensors"
    assert input_key("") == "inputs" and input_key("a.0") == "inputs.a.0"
    structure = {"dict": [["b", {"tuple": ["tensor", "tensor"]}], ["a", "tensor"]]}
    assert chunk_keys("tensor") == ["inputs", "targets"]
    keys = chunk_keys(structure)
    assert keys[-1] == "targets" and sorted(keys[:-1]) == ["inputs.a", "inputs.b.0", "inputs.b.1"]


def test_own_contiguous_copies_views_and_keeps_a_tensor_that_owns_its_storage() -> None:
    whole = torch.arange(12.0)
    assert own_contiguous(whole) is whole
    for view in (whole[:4], whole[4:8], whole.view(3, 4)[:, 1]):
        owned = own_contiguous(view)
        assert torch.equal(owned, view) and owned.untyped_storage().nbytes() == view.numel() * 4
        assert owned.storage_offset() == 0 and owned.is_contiguous()
    assert own_contiguous(whole.view(3, 4)).untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def _linked(path: Path) -> LinkedFile:
    data = path.read_bytes()
    return LinkedFile(path, hashlib.sha256(data).hexdigest(), len(data), file_identity(os.stat(path)))


def test_chunks_read_from_a_file_are_linked_and_the_others_written(tmp_path: Path) -> None:
    kept, gone = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    kept.write_bytes(b"x")
    gone.write_bytes(b"y")
    sources = [_linked(kept), _linked(gone), None]
    gone.unlink()
    chunks = [(torch.ones(2, 1), torch.zeros(2, dtype=torch.long)), (torch.full((1, 1), 2.0), torch.ones(1).long()),
              (torch.full((3, 1), 3.0), torch.full((3,), 2))]  # fmt: skip
    tensors, linked = chunk_files(["c0", "c1", "c2"], chunks, sources)
    assert linked == {"c0": sources[0]} and sorted(tensors) == ["c1", "c2"]
    assert torch.equal(tensors["c1"]["inputs"], chunks[1][0]) and torch.equal(tensors["c2"]["targets"], chunks[2][1])
    assert sorted(tensors["c2"]) == ["inputs", "targets"]


def test_written_file_is_the_manifest_entry_with_the_files_identity(tmp_path: Path) -> None:
    (tmp_path / "chunk_000000.safetensors").write_bytes(b"abc")
    manifest = {"files": {"chunk_000000.safetensors": {"sha256": "f" * 64, "bytes": 3}}}
    linked = written_file(tmp_path, "chunk_000000.safetensors", manifest)
    assert linked == LinkedFile(tmp_path / "chunk_000000.safetensors", "f" * 64, 3,
                                file_identity(os.stat(tmp_path / "chunk_000000.safetensors")))  # fmt: skip


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_a_chunk_with_unaligned_tensors_is_read_by_copy_with_the_same_values(tmp_path: Path) -> None:
    """Another writer may put an int64 tensor at an odd offset: its values are copied out."""
    path = tmp_path / "chunk_000000.safetensors"
    inputs = bytes([1, 2, 3, 4, 5, 6])
    targets = torch.tensor([7, 9], dtype=torch.int64).numpy().tobytes()
    header = {"inputs": {"dtype": "U8", "shape": [2, 3], "data_offsets": [0, 6]},
              "targets": {"dtype": "I64", "shape": [2], "data_offsets": [6, 22]}}  # fmt: skip
    _raw_safetensors(path, header, inputs + targets)
    x, y = map_chunk(_linked(path))
    assert x.dtype == torch.uint8 and x.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert y.dtype == torch.int64 and y.tolist() == [7, 9]


def test_a_chunk_whose_leaf_and_targets_differ_in_length_is_refused(tmp_path: Path) -> None:
    from retain.state import StateError

    path = tmp_path / "chunk_000000.safetensors"
    header = {"targets": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
              "inputs": {"dtype": "F32", "shape": [3, 1], "data_offsets": [16, 28]}}  # fmt: skip
    _raw_safetensors(path, header, b"\0" * 28)
    with pytest.raises(StateError, match=r"inputs \(3, 1\) and targets \(2,\) differ in length"):
        map_chunk(_linked(path))


# ------------------------------------------------------------------------------ ChunkedDataset
def test_a_chunk_of_one_value_per_item_maps_and_a_leaf_without_an_item_axis_is_refused(tmp_path: Path) -> None:
    """A 1-D leaf (one value per item, e.g. a length) is a valid chunk; a 0-D one has no items."""
    from retain.state import StateError

    path = tmp_path / "chunk_000000.safetensors"
    header = {"targets": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
              "inputs": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}  # fmt: skip
    _raw_safetensors(path, header, torch.tensor([1, 0]).numpy().tobytes() + torch.tensor([0.5, 2.0]).numpy().tobytes())
    x, y = map_chunk(_linked(path))
    assert x.tolist() == [0.5, 2.0] and y.tolist() == [1, 0]
    scalar = tmp_path / "chunk_000001.safetensors"
    header = {"targets": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
              "inputs": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}}  # fmt: skip
    _raw_safetensors(scalar, header, b"\0" * 12)
    with pytest.raises(StateError, match=r"inputs \(\) and targets \(1,\) differ in length"):
        map_chunk(_linked(scalar))


def _chunks() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2])),
        (torch.arange(100.0, 104.0).view(1, 4), torch.tensor([3])),
        (torch.arange(200.0, 204.0).view(2, 2), torch.tensor([4, 5])),
    ]


def test_a_chunked_dataset_indexes_like_the_padded_concatenation() -> None:
    dataset = ChunkedDataset(_chunks(), pad_values={"": -1})
    assert len(dataset) == 6 and dataset.starts.tolist() == [0, 3, 4] and dataset.shapes == {"": (4,)}
    assert dataset.item_bytes == 4 * 4  # every item at the longest chunk's length
    assert dataset.targets.tolist() == [0, 1, 2, 3, 4, 5]
    x, y = dataset[3]
    assert x.tolist() == [100.0, 101.0, 102.0, 103.0] and int(y) == 3
    x, y = dataset[-6]
    assert x.tolist() == [0.0, 1.0, -1.0, -1.0] and int(y) == 0
    assert dataset[-1][0].tolist() == [202.0, 203.0, -1.0, -1.0] and dataset[5][0].tolist() == [202.0, 203.0, -1, -1]
    for bad in (6, -7):
        with pytest.raises(IndexError, match=rf"index {bad} out of range for 6 items"):
            dataset[bad]
    gathered = dataset.gather_inputs(torch.tensor([5, 0, 3, 4]))
    assert gathered.tolist() == [[202, 203, -1, -1], [0, 1, -1, -1], [100, 101, 102, 103], [200, 201, -1, -1]]


def test_one_chunk_is_gathered_in_the_order_asked() -> None:
    dataset = ChunkedDataset(_chunks()[:1])
    grouped, slot = dataset.gather_grouped(torch.tensor([2, 0]))
    assert slot is None and grouped[""].tolist() == [[4.0, 5.0], [0.0, 1.0]]


def test_nested_chunks_report_the_bytes_of_every_padded_leaf() -> None:
    half = torch.float16
    a = ({"ids": torch.zeros(2, 3, dtype=torch.long), "w": torch.zeros(2, 1, dtype=half)}, torch.zeros(2).long())
    b = ({"ids": torch.zeros(1, 5, dtype=torch.long), "w": torch.zeros(1, 1, dtype=half)}, torch.zeros(1).long())
    dataset = ChunkedDataset([a, b], pad_values={"ids": 9})
    assert dataset.shapes == {"ids": (5,), "w": (1,)} and dataset.pad_values == {"ids": 9, "w": 0}
    assert dataset.item_bytes == 5 * 8 + 1 * 2
    assert dataset[0][0]["ids"].tolist() == [0, 0, 0, 9, 9]


@pytest.mark.parametrize(
    "second, message",
    [
        (({"x": torch.zeros(1, 2)}, torch.zeros(1, dtype=torch.long)), r"chunks differ: chunk 1 has inputs \{'dict'"),
        ((torch.zeros(1, 2), torch.zeros(1, dtype=torch.int32)), r"chunk 1 has torch.int32 targets, chunk 0 torch.in"),
        ((torch.zeros(1, 2).double(), torch.zeros(1).long()), r"inputs of chunk 1 is torch.float64 \(1, 2\) for"),
        ((torch.zeros(1, 2, 1), torch.zeros(1).long()), r"inputs of chunk 1 is torch.float32 \(1, 2, 1\) for 1"),
        ((torch.zeros(2, 2), torch.zeros(1).long()), r"inputs of chunk 1 is torch.float32 \(2, 2\) for 1 targets"),
    ],
    ids=["structure", "targets-dtype", "leaf-dtype", "leaf-dims", "leaf-rows"],
)
def test_chunks_that_do_not_concatenate_are_refused(second: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkedDataset([(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), second])


def test_a_chunked_dataset_needs_a_chunk_and_a_batch_source_an_item() -> None:
    with pytest.raises(ValueError, match=r"^a chunked dataset needs at least one chunk$"):
        ChunkedDataset([])
    empty = ChunkedDataset([(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"^the dataset is empty: an update needs at least one item$"):
        ChunkedBatchSource(empty, 2, CPU, shuffle=False)


# --------------------------------------------------------------------------- ChunkedBatchSource
def _concatenated() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((6, 4), -1.0)
    x[:3, :2] = torch.arange(6.0).view(3, 2)
    x[3] = torch.arange(100.0, 104.0)
    x[4:, :2] = torch.arange(200.0, 204.0).view(2, 2)
    return x, torch.arange(6)


@pytest.mark.parametrize("chunks", [1, 3])
def test_batches_without_shuffle_come_in_order_and_the_last_one_is_short(chunks: int) -> None:
    dataset = ChunkedDataset(_chunks() if chunks == 3 else [_concatenated()], pad_values={"": -1})
    source = ChunkedBatchSource(dataset, 4, CPU, shuffle=False)
    assert source.num_batches == len(source) == 2
    batches = list(source)
    x, _ = _concatenated()
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert torch.equal(batches[0][0], x[:4]) and torch.equal(batches[1][0], x[4:])


@pytest.mark.parametrize("chunks", [1, 3])
def test_shuffled_batches_follow_the_generators_permutation(chunks: int) -> None:
    dataset = ChunkedDataset(_chunks() if chunks == 3 else [_concatenated()], pad_values={"": -1})
    source = ChunkedBatchSource(dataset, 4, CPU, shuffle=True, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    x, _ = _concatenated()
    batches = list(source)
    assert torch.cat([b[1] for b in batches]).tolist() == order.tolist()
    assert torch.equal(torch.cat([b[0] for b in batches]), x[order])


def test_a_subset_source_batches_only_its_items_and_its_first_batch_draws_nothing() -> None:
    dataset = ChunkedDataset(_chunks(), pad_values={"": -1})
    generator = torch.Generator().manual_seed(0)
    source = ChunkedBatchSource(dataset, 2, CPU, shuffle=True, generator=generator, indices=torch.tensor([5, 1, 3]))
    assert source.num_batches == 2
    before = generator.get_state().clone()
    x, y = source.first_batch()
    assert torch.equal(generator.get_state(), before)
    assert y.tolist() == [5, 1] and x.tolist() == [[202, 203, -1, -1], [2, 3, -1, -1]]
    got = sorted(int(t) for _, ys in source for t in ys)
    assert got == [1, 3, 5]
    short = ChunkedBatchSource(dataset, 10, CPU, shuffle=False)
    assert short.first_batch()[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_the_gather_window_is_whole_batches_of_about_window_bytes() -> None:
    dataset = ChunkedDataset(_chunks(), pad_values={"": -1})  # 16 bytes per item
    source = ChunkedBatchSource(dataset, 3, CPU, shuffle=False)
    source.WINDOW_BYTES = 16 * 7  # 7 items: two whole batches of 3
    assert source._window() == 6
    source.WINDOW_BYTES = 1  # less than a batch: still one batch
    assert source._window() == 3
