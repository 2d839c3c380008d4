"""The state writer's linked files and the reader's mapped files, below the Joint updater."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from retain.chunks import ChunkedBatchSource, ChunkedDataset, chunk_name, map_chunk
from retain.state import StateError, StateFolder, write_state

MANIFEST = {
    "retain_version": "0",
    "method": "M",
    "model": {"class": "C", "hyperparameters": {}, "task_ids": []},
    "method_options": {},
    "options": {},
    "updates_done": 1,
    "task_ids_seen": [],
}


def _chunk_tensors(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.rand(n, 3, generator=g), "targets": torch.arange(n) % 2}


def _state(folder: Path, **linked) -> Path:
    return write_state(folder, MANIFEST, {"a.json": {"x": 1}}, {chunk_name(0): _chunk_tensors()}, linked_files=linked)


def test_linked_files_are_hard_links_listed_with_their_known_checksum(tmp_path: Path) -> None:
    first = StateFolder(_state(tmp_path / "a"))
    source = first.mapped_file(chunk_name(0))
    data = (tmp_path / "a" / chunk_name(0)).read_bytes()
    assert source.sha256 == hashlib.sha256(data).hexdigest() and source.bytes == len(data)
    write_state(tmp_path / "b", MANIFEST, {}, {}, linked_files={chunk_name(1): source})
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["files"][chunk_name(1)] == {"sha256": source.sha256, "bytes": source.bytes}
    assert (tmp_path / "b" / chunk_name(1)).stat().st_ino == (tmp_path / "a" / chunk_name(0)).stat().st_ino
    x, y = map_chunk(StateFolder(tmp_path / "b").mapped_file(chunk_name(1)))
    assert torch.equal(x, _chunk_tensors()["inputs"]) and torch.equal(y, _chunk_tensors()["targets"])


def test_a_name_given_as_contents_and_as_linked_file_is_refused(tmp_path: Path) -> None:
    source = StateFolder(_state(tmp_path / "a")).mapped_file(chunk_name(0))
    with pytest.raises(ValueError, match=r"both as contents and as linked files: \['chunk_000000.safetensors'\]"):
        _state(tmp_path / "b", **{chunk_name(0): source})
    assert not (tmp_path / "b").exists()


def test_a_linked_file_deleted_before_the_write_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    source = StateFolder(_state(tmp_path / "a")).mapped_file(chunk_name(0))
    (tmp_path / "a" / chunk_name(0)).unlink()
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: a file the new state reuses is missing"):
        write_state(tmp_path / "b", MANIFEST, {}, {}, linked_files={chunk_name(0): source})
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_mapped_files_are_not_read_as_payloads(tmp_path: Path) -> None:
    state = StateFolder(_state(tmp_path / "a"))
    assert state.has(chunk_name(0)) and chunk_name(0) not in state._json and not state.has("b.json")
    with pytest.raises(StateError, match=r"chunk_000000.safetensors is a mapped file"):
        state.tensors(chunk_name(0))
    with pytest.raises(StateError, match=r"a.json is missing \(not a mapped file"):
        state.mapped_file("a.json")


def test_a_chunk_with_other_tensors_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = {**_chunk_tensors(), "extra": torch.zeros(2)}
    write_state(tmp_path / "a", MANIFEST, {}, {chunk_name(0): bad})
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: a data chunk holds exactly the tensors"):
        map_chunk(StateFolder(tmp_path / "a").mapped_file(chunk_name(0)))


def test_a_chunk_with_float_targets_is_refused(tmp_path: Path) -> None:
    write_state(tmp_path / "a", MANIFEST, {}, {chunk_name(0): {"inputs": torch.zeros(2, 3), "targets": torch.zeros(2)}})
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: targets must be a 1-D integer tensor"):
        map_chunk(StateFolder(tmp_path / "a").mapped_file(chunk_name(0)))


def test_map_chunk_refuses_a_file_replaced_after_verification(tmp_path: Path) -> None:
    source = StateFolder(_state(tmp_path / "a")).mapped_file(chunk_name(0))
    path = tmp_path / "a" / chunk_name(0)
    path.unlink()
    path.write_bytes(save(_chunk_tensors(seed=1)))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: the file changed after its checksum"):
        map_chunk(source)


def test_mapped_tensors_outlive_the_state_folder_object(tmp_path: Path) -> None:
    x, _ = map_chunk(StateFolder(_state(tmp_path / "a")).mapped_file(chunk_name(0)))
    import gc

    gc.collect()
    assert torch.equal(x.clone(), _chunk_tensors()["inputs"])


@pytest.mark.parametrize("window_bytes", [32 * 2**20, 8 * 8], ids=["one-window", "windows-of-two-batches"])
def test_chunked_batches_equal_batches_of_the_concatenation(window_bytes: int, monkeypatch) -> None:
    monkeypatch.setattr(ChunkedBatchSource, "WINDOW_BYTES", window_bytes)
    chunks = [(torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * c, torch.full((n,), c)) for c, n in
              enumerate([3, 1, 7, 4])]  # fmt: skip
    data = ChunkedDataset(chunks)
    all_x, all_y = torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks])
    assert len(data) == 15 and torch.equal(data[9][0], all_x[9]) and int(data[-1][1]) == 3
    source = ChunkedBatchSource(data, 4, torch.device("cpu"), shuffle=True, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(15, generator=torch.Generator().manual_seed(5))
    batches = list(source)
    assert len(batches) == len(source) == 4
    for i, (x, y) in enumerate(batches):
        idx = order[4 * i : 4 * i + 4]
        assert torch.equal(x, all_x[idx]) and torch.equal(y, all_y[idx])
    subset = ChunkedBatchSource(data, 2, torch.device("cpu"), shuffle=False, indices=torch.tensor([14, 0, 5]))
    assert [b[1].tolist() for b in subset] == [[3, 0], [2]]
