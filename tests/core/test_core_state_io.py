"""The state writer's pipeline (write ahead, hash behind, fsync overlapping the hash), the files of
a state written at the same time, and the finiteness check that allocates nothing the size of a
tensor: each gives what the plain sequential version gives."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch

import retain.state as state
from retain.state import StateError, StateFolder, all_finite, check_finite, write_file, write_state

MANIFEST = {
    "retain_version": "test", "method": "test", "model": {"class": "x", "hyperparameters": {}, "task_ids": []},
    "method_options": {}, "options": {}, "updates_done": 0, "task_ids_seen": [],
}  # fmt: skip


@pytest.mark.parametrize("pieces", [0, 1, 3, 40])
def test_write_file_hashes_and_writes_every_byte_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pieces: int
) -> None:
    """With pieces of 1 KiB, 40 pieces run the hash well behind the writes (``_AHEAD`` is 16)."""
    monkeypatch.setattr(state, "_PIECE", 1024)
    data = os.urandom(1024 * pieces + (7 if pieces else 0))
    chunks = [data[: len(data) // 3], memoryview(data)[len(data) // 3 :]]
    entry = write_file(tmp_path / "f.bin", chunks)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_write_file_keeps_a_bounded_number_of_streamed_pieces_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream of new pieces (a copy read from another file) is not held whole until it is hashed."""
    monkeypatch.setattr(state, "_PIECE", 1024)
    alive = {"now": 0, "most": 0}

    class Piece(bytes):
        def __del__(self) -> None:
            alive["now"] -= 1

    def stream():
        for i in range(200):
            alive["now"] += 1
            alive["most"] = max(alive["most"], alive["now"])
            yield Piece(bytes([i]) * 1024)

    entry = write_file(tmp_path / "f.bin", stream())
    assert entry["bytes"] == 200 * 1024
    assert alive["most"] <= state._AHEAD + 3, alive


def test_a_failing_write_raises_and_stops_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "_PIECE", 1024)
    calls = {"n": 0}
    real_open = open

    class FailingFile:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, piece) -> int:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device", "f.bin")
            return self.f.write(piece)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: FailingFile(real_open(*a, **k)))
    with pytest.raises(OSError, match="No space left on device"):
        write_file(tmp_path / "f.bin", [bytes(1024 * 100)])
    assert calls["n"] <= state._AHEAD + 3  # the queued writes after the failure were cancelled


def test_the_files_of_a_state_are_written_at_the_same_time_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, int] = {}
    real = state.write_file

    def spy(path: Path, chunks):
        threads[path.name] = threading.get_ident()
        return real(path, chunks)

    tensors = {"a": torch.arange(10_000, dtype=torch.float32), "b": torch.arange(7, dtype=torch.int64)}
    json_files = {"one.json": {"x": 1}, "two.json": {"y": [1, 2]}}
    tensor_files = {"t.safetensors": tensors, "u.safetensors": {"c": torch.ones(3, 4)}}
    write_state(tmp_path / "sequential", MANIFEST, json_files, tensor_files)
    monkeypatch.setattr(state, "write_file", spy)
    write_state(tmp_path / "parallel", MANIFEST, json_files, tensor_files)
    files = {n: t for n, t in threads.items() if n != "manifest.json"}  # the manifest comes after them
    assert len(files) == 4
    assert files["t.safetensors"] == threading.get_ident()  # the largest in the calling thread
    # the others in the pool's threads, beside it (a pool thread that is done may take a second file)
    assert all(ident != threading.get_ident() for name, ident in files.items() if name != "t.safetensors")
    names = sorted(p.name for p in (tmp_path / "parallel").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sequential").iterdir())
    for name in names:
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()
    loaded = StateFolder(tmp_path / "parallel").tensors("t.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_one_failing_file_of_a_state_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = state.write_file

    def failing(path: Path, chunks):
        if path.name == "two.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, chunks)

    monkeypatch.setattr(state, "write_file", failing)
    json_files = {"one.json": {"x": 1}, "two.json": {"y": 2}}
    with pytest.raises(OSError, match="No space left on device"):
        write_state(tmp_path / "v0", MANIFEST, json_files, {"t.safetensors": {"a": torch.ones(1000)}})
    assert list(tmp_path.iterdir()) == []


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_every_nan_and_inf(dtype: torch.dtype, bad: float) -> None:
    if dtype == torch.float8_e4m3fn and bad != float("nan") and bad == bad:
        pytest.skip("float8_e4m3fn has no Inf (it saturates to 448)")
    for n in (1, 7, 33, 1027, 70_001):
        for position in sorted({0, n // 3, n // 2, n - 1}):
            x = torch.zeros(n, dtype=torch.float32)
            x[position] = bad
            x = x.to(dtype)
            assert not all_finite(x), (n, position)
            assert not all_finite(x.reshape(1, n)), (n, position)
    assert all_finite(torch.randn(1000).to(dtype))


def test_all_finite_on_views_empty_and_integer_tensors() -> None:
    x = torch.zeros(64, 64)
    x[5, 3] = float("nan")
    assert not all_finite(x[:, 1::2]) and all_finite(x[:, 1::2][:, 2:]) and all_finite(x[:, ::2])  # column 3
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.bool))


def test_check_finite_names_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=r"weights.safetensors: tensor 'w' contains NaN or Inf"):
        check_finite({"v": torch.ones(3), "w": torch.tensor([1.0, float("inf")])}, tmp_path / "weights.safetensors")
