"""Joint keeps its data as one chunk file per update: later states hard-link the earlier chunks,
training streams them from memory maps, and every chunk is still verified by checksum."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from retain import JointModelUpdater, MultiLayerPerceptron, StateError
from retain import state as state_module
from retain.batching import BatchSource
from retain.chunks import ChunkedBatchSource, chunk_name
from retain.state import StateFolder

OPTIONS = {"batch_size": 16, "max_epochs": 1, "seed": 3, "accelerator": "cpu"}


def _updater(input_folder: Path | None, output_folder: Path | None) -> JointModelUpdater:
    torch.manual_seed(0)
    return JointModelUpdater(
        MultiLayerPerceptron(64, 10, [32]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        input_state_folder=input_folder,
        output_state_folder=output_folder,
        **OPTIONS,
    )


def _chunk(k: int, n: int = 60) -> TensorDataset:
    """``n`` items of class ``k % 10`` and ``(k + 1) % 10``, different for every ``k``."""
    g = torch.Generator().manual_seed(100 + k)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.tensor([k % 10, (k + 1) % 10] * (n // 2)))


def _run(tmp_path: Path, updates: int, n: int = 60) -> list[Path]:
    """``updates`` updates, each a new updater built from the previous state folder."""
    folders: list[Path] = []
    for k in range(updates):
        out = tmp_path / f"s{k}"
        _updater(folders[-1] if folders else None, out).update(_chunk(k, n))
        folders.append(out)
    return folders


def test_state_holds_one_chunk_per_update_and_links_the_earlier_ones(tmp_path: Path) -> None:
    s0, s1, s2 = _run(tmp_path, 3)
    names = sorted(p.name for p in s2.iterdir() if p.name.startswith("chunk_"))
    assert names == [chunk_name(0), chunk_name(1), chunk_name(2)]
    inodes = {(s / chunk_name(0)).stat().st_ino for s in (s0, s1, s2)}
    assert len(inodes) == 1
    assert (s2 / chunk_name(0)).stat().st_nlink == 3 and (s2 / chunk_name(2)).stat().st_nlink == 1
    learner = _updater(s2, None).learner
    assert learner.loaded_chunk_names == names
    for k, (x, y) in enumerate(learner.chunks):
        assert torch.equal(x, _chunk(k).tensors[0]) and torch.equal(y, _chunk(k).tensors[1])
    assert "seen_inputs" not in StateFolder(s2).tensors("learner.safetensors")  # no copy of all data


def test_training_data_of_the_update_equals_all_chunks_so_far(tmp_path: Path) -> None:
    folders = _run(tmp_path, 3)
    updater = _updater(folders[-1], tmp_path / "s3")
    from first_epoch import FirstEpoch  # here: the subprocess scripts import this module with tests/joint only

    learner = updater.learner
    epoch = FirstEpoch(learner)
    updater.update(_chunk(3))
    assert isinstance(epoch.source, ChunkedBatchSource)
    every = [_chunk(k) for k in range(4)]
    reference = BatchSource(
        TensorDataset(torch.cat([d.tensors[0] for d in every]), torch.cat([d.tensors[1] for d in every])),
        learner.train_batch_size, learner.device, shuffle=True, generator=epoch.generator(),
    )  # fmt: skip
    expected = list(reference)
    batches = epoch.batches
    assert len(batches) == len(expected) == len(epoch.source)
    for (x, y), (ex, ey) in zip(batches, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    seen = torch.cat([x for x, _ in batches])
    assert seen.shape[0] == 4 * 60 and torch.equal(seen.sort(0).values, learner.seen_inputs.sort(0).values)


_CONTINUE = """
import functools, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_joint_chunks import _chunk, _updater
from pathlib import Path
_updater(Path({src!r}), Path({out!r})).update(_chunk(2))
"""


def test_chunked_state_continues_identically_in_a_new_process(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    here = _updater(s1, tmp_path / "here")
    here.update(_chunk(2))
    script = _CONTINUE.format(tests=str(Path(__file__).parent), src=str(s1), out=str(tmp_path / "there"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "there").iterdir())
    assert chunk_name(2) in names
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name


def test_a_missing_chunk_is_refused_naming_the_file(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    (s1 / chunk_name(0)).unlink()
    with pytest.raises(StateError, match=r"missing: \['chunk_000000.safetensors'\]"):
        _updater(s1, None)


@pytest.mark.parametrize("background", [True, False], ids=["verified-while-training", "verified-at-load"])
def test_an_altered_chunk_is_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    _, s1 = _run(tmp_path, 2)
    path = s1 / chunk_name(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setattr(JointModelUpdater, "verify_chunks_in_background", background)
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: checksum mismatch"):
        _updater(s1, tmp_path / "s2").update(_chunk(2))
    assert not (tmp_path / "s2").exists()


def test_a_chunk_altered_after_an_earlier_verification_in_the_process_is_refused(tmp_path: Path) -> None:
    """The in-process record of verified inodes must not let a later edit through."""
    _, s1 = _run(tmp_path, 2)
    path = s1 / chunk_name(0)
    old = path.stat().st_mtime_ns - 5_000_000_000
    os.utime(path, ns=(old, old))  # settled: its first verification is recorded
    _updater(s1, None).join_chunk_verification()
    assert any(key[1] == path.stat().st_ino for key in state_module._VERIFIED)
    with open(path, "r+b") as f:  # an in-place edit of the same size
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        _updater(s1, None).join_chunk_verification()


def test_a_chunk_altered_between_load_and_save_is_not_linked(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    updater = _updater(s1, tmp_path / "s2")
    updater.join_chunk_verification()
    _flip_an_input_bit(s1 / chunk_name(0))  # in place, after the checksum was verified
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: the file the new state reuses was altered"):
        updater.update(_chunk(2))
    assert not (tmp_path / "s2").exists()


def test_chunk_names_edited_in_learner_json_are_refused(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    learner_path, manifest_path = s1 / "learner.json", s1 / "manifest.json"
    learner = json.loads(learner_path.read_text())
    learner["chunks"] = [chunk_name(0)]
    learner_path.write_text(json.dumps(learner))
    manifest = json.loads(manifest_path.read_text())  # a consistent forgery: checksums updated
    data = learner_path.read_bytes()
    import hashlib

    manifest["files"]["learner.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StateError, match=r"learner.json: chunks must be chunk_000000.safetensors"):
        _updater(s1, None)


def _flip_an_input_bit(path: Path) -> None:
    """Flips the lowest bit of the first input value, in place (same size, a valid float)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + header_len])["inputs"]["data_offsets"][0]
    data[8 + header_len + begin] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))


def _new_bytes(folders: list[Path]) -> list[int]:
    """Disk bytes (st_blocks) of each folder's inodes not present in any earlier folder."""
    seen: set[int] = set()
    out = []
    for folder in folders:
        total = 0
        for path in folder.iterdir():
            st = path.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
        out.append(total)
    return out


def test_new_disk_use_of_an_update_does_not_grow_with_the_updates_before(tmp_path: Path) -> None:
    folders = _run(tmp_path, 7, n=200)
    new = _new_bytes(folders)
    chunk_bytes = (folders[1] / chunk_name(1)).stat().st_size
    assert chunk_bytes > 50_000
    assert abs(new[6] - new[1]) <= 4096, new  # learner.json and the manifest grow by a name per update
    total = sum((f / p.name).stat().st_size for f in folders for p in f.iterdir())
    assert total > 2 * sum(new)  # the states share most of their bytes
    assert (folders[6] / chunk_name(0)).stat().st_nlink == 7


def test_chunks_are_copied_and_verified_where_hard_links_fail(tmp_path: Path, monkeypatch) -> None:
    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    s0, s1, s2 = _run(tmp_path, 3)
    assert (s2 / chunk_name(0)).stat().st_ino != (s1 / chunk_name(0)).stat().st_ino
    assert (s2 / chunk_name(0)).read_bytes() == (s0 / chunk_name(0)).read_bytes()
    assert len(_updater(s2, None).learner.chunks) == 3

    updater = _updater(s2, tmp_path / "s3")
    updater.join_chunk_verification()
    _flip_an_input_bit(s2 / chunk_name(1))  # altered after its verification, before the copy
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: the file the new state reuses was altered"):
        updater.update(_chunk(3))


def test_resume_checkpoint_of_a_joint_update_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """A checkpoint holds no chunk files: the update that restores it keeps the chunks it holds."""
    _, s1 = _run(tmp_path, 2)
    options = {**OPTIONS, "max_epochs": 3}
    torch.manual_seed(0)
    kwargs = dict(
        optimizer=functools.partial(torch.optim.SGD, lr=0.05), input_state_folder=s1, checkpoint_every_n_epochs=1,
        **options,
    )  # fmt: skip
    straight = JointModelUpdater(MultiLayerPerceptron(64, 10, [32]), output_state_folder=tmp_path / "a", **kwargs)
    straight.update(_chunk(2))

    class StopError(Exception):
        pass

    interrupted = JointModelUpdater(
        MultiLayerPerceptron(64, 10, [32]), output_state_folder=tmp_path / "b", **kwargs
    )
    calls = {"n": 0}
    step = interrupted.learner.on_train_batch_end

    def stop_in_epoch_two(*args, **kw) -> None:
        step(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 18:  # 180 items / 16 -> 12 steps per epoch: inside the second epoch
            raise StopError

    interrupted.learner.on_train_batch_end = stop_in_epoch_two  # type: ignore[method-assign]
    with pytest.raises(StopError):
        interrupted.update(_chunk(2))
    resumed = JointModelUpdater(
        MultiLayerPerceptron(64, 10, [32]), output_state_folder=tmp_path / "b", **kwargs
    )
    resumed.update(_chunk(2))
    assert resumed.resumed_from_epoch == 1
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_failed_attempt_of_an_update_leaves_no_extra_chunk(tmp_path: Path) -> None:
    from retain import NonFiniteLossError

    updater = JointModelUpdater(
        MultiLayerPerceptron(64, 10, [32]), optimizer=functools.partial(torch.optim.SGD, lr=1e30),
        output_state_folder=tmp_path / "s0", log_every_n_steps=1, **OPTIONS,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="step"):
        updater.update(_chunk(0))
    assert len(updater.learner.chunks) == 1 and not (tmp_path / "s0").exists()
    updater.learner.optimizer_factory = functools.partial(torch.optim.SGD, lr=0.05)
    updater.update(_chunk(0))
    assert len(updater.learner.chunks) == 1 and updater.learner.updates_done == 1
    assert len(_updater(tmp_path / "s0", None).learner.chunks) == 1


def test_verify_mapped_every_time_hashes_even_a_recorded_inode(tmp_path: Path, monkeypatch) -> None:
    """The in-process record trusts (inode, size, mtime); with VERIFY_MAPPED_EVERY_TIME an edit
    that also restores the mtime (os.utime) is caught too."""
    _, s1 = _run(tmp_path, 2)
    path = s1 / chunk_name(0)
    old = path.stat().st_mtime_ns - 5_000_000_000
    os.utime(path, ns=(old, old))
    _updater(s1, None).join_chunk_verification()  # recorded
    _flip_an_input_bit(path)
    os.utime(path, ns=(old, old))
    monkeypatch.setattr(state_module, "VERIFY_MAPPED_EVERY_TIME", True)
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: checksum mismatch"):
        _updater(s1, None).join_chunk_verification()
