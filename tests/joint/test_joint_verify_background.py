"""Joint verifies the chunks of earlier updates while it trains: a background thread hashes them,
started at load and joined before the state is written and before ``update`` returns. An altered
chunk is refused with the message a load-time check gives and nothing is written, also when it is
found only after training; sizes and headers are still checked at load; the states are the same
bytes as those of the sequential path (every chunk hashed before training)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import retain.state as state_module
from retain import JointModelUpdater, StateError
from retain.chunks import chunk_name

sys.path.insert(0, str(Path(__file__).parent))
from test_joint_chunks import _CONTINUE, _chunk, _flip_an_input_bit, _run, _updater


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_background_path_writes_the_same_states_as_the_sequential_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "VERIFY_MAPPED_EVERY_TIME", True)  # every load hashes every chunk
    runs = {}
    for background in (False, True):
        monkeypatch.setattr(JointModelUpdater, "verify_chunks_in_background", background)
        runs[background] = _run(tmp_path / str(background), 4)
    for sequential, overlapped in zip(runs[False], runs[True], strict=True):
        assert _files(sequential) == _files(overlapped), sequential.name


def test_the_verification_runs_during_the_update_and_is_joined_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, s1 = _run(tmp_path, 2)
    monkeypatch.setattr(state_module, "VERIFY_MAPPED_EVERY_TIME", True)
    hashed: list[tuple[str, str]] = []
    real = state_module._hash_mapped

    def spy(f, path, entry, identity):
        hashed.append((path.name, threading.current_thread().name))
        return real(f, path, entry, identity)

    monkeypatch.setattr(state_module, "_hash_mapped", spy)
    updater = _updater(s1, tmp_path / "s2")
    check = updater._chunk_check
    assert check is not None and [path.name for path, _, _ in check.files] == [chunk_name(0), chunk_name(1)]
    updater.update(_chunk(2))
    assert check.done and check.error is None
    assert sorted(hashed) == [(chunk_name(0), "retain-verify-mapped"), (chunk_name(1), "retain-verify-mapped")]
    assert (tmp_path / "s2" / chunk_name(2)).exists()


def test_a_chunk_found_altered_only_after_training_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, s1 = _run(tmp_path, 2)
    data = bytearray((s1 / chunk_name(0)).read_bytes())
    data[-9] ^= 0x04
    (s1 / chunk_name(0)).write_bytes(bytes(data))
    trained = threading.Event()
    real = state_module._hash_mapped

    def after_training(f, path, entry, identity):
        assert trained.wait(120), "training never ended"
        return real(f, path, entry, identity)

    monkeypatch.setattr(state_module, "_hash_mapped", after_training)
    updater = _updater(s1, tmp_path / "s2")
    end = updater.learner.on_model_update_end

    def on_end() -> None:
        end()
        trained.set()

    updater.learner.on_model_update_end = on_end  # type: ignore[method-assign]
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch .* corrupt or was edited"):
        updater.update(_chunk(2))
    assert trained.is_set()  # the update trained before the mismatch was known
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]  # no state, no temporary, no lock
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        updater.update(_chunk(2))  # and it stays refused


def test_sizes_and_headers_are_still_checked_at_load(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    path = s1 / chunk_name(1)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: size mismatch"):
        _updater(s1, tmp_path / "s2")
    path.unlink()
    with pytest.raises(StateError, match=r"missing: \['chunk_000001.safetensors'\]"):
        _updater(s1, tmp_path / "s2")


def test_a_chunk_header_forged_with_its_size_kept_is_refused_at_load(tmp_path: Path) -> None:
    """The bounded header read at load refuses it before anything is allocated or trained (the
    background hash would find it only later)."""
    _, s1 = _run(tmp_path, 2)
    path = s1 / chunk_name(0)
    data = bytearray(path.read_bytes())
    data[0:8] = (len(data)).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors is not a valid safetensors file: header of"):
        _updater(s1, tmp_path / "s2")


def test_a_chunk_altered_between_processes_is_refused_in_a_fresh_process(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    _flip_an_input_bit(s1 / chunk_name(1))
    # the next update, in a new process
    script = _CONTINUE.format(tests=str(Path(__file__).parent), src=str(s1), out=str(tmp_path / "s2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "StateError" in last and "chunk_000001.safetensors: checksum mismatch" in last, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]


def test_checkpointed_and_sequential_updates_hash_every_chunk_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, s1 = _run(tmp_path, 2)
    _flip_an_input_bit(s1 / chunk_name(0))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        torch.manual_seed(0)
        JointModelUpdater(
            _updater(None, None).model, input_state_folder=s1, output_state_folder=tmp_path / "s2",
            checkpoint_every_n_epochs=1, max_epochs=1, accelerator="cpu",
        )  # fmt: skip
    monkeypatch.setattr(JointModelUpdater, "verify_chunks_in_background", False)
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        _updater(s1, None)
