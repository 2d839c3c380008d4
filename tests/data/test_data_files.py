"""File handling: checksums, missing and corrupt files, downloads (served from local files), caches."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retain.data import datasets
from retain.data.datasets import DatasetFileError, FileSpec, download_file, load_dataset, read_idx, verify_file

MNIST_FILES = list(datasets.FILE_SPECS["mnist"])


def _spec_for(blob: bytes, name: str = "blob.bin", urls: tuple[str, ...] = ("https://example.invalid/a",),
              algorithm: str = "sha256") -> FileSpec:
    return FileSpec(name, len(blob), algorithm, hashlib.new(algorithm, blob).hexdigest(), urls)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0x01]))


# --------------------------------------------------------------------------------------------------
# verification


def test_verify_accepts_good_file_and_remembers_it(tmp_path: Path, monkeypatch) -> None:
    blob = b"retain" * 1000
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    spec = _spec_for(blob)
    hashed: list[Path] = []
    real_hash = datasets._hash_file

    def counting_hash(file: Path, algorithm: str) -> str:
        hashed.append(Path(file))
        return real_hash(file, algorithm)

    monkeypatch.setattr(datasets, "_hash_file", counting_hash)
    verify_file(path, spec)
    assert hashed == [path]  # the first check reads the file
    verify_file(path, spec)  # in-process memo
    monkeypatch.setattr(datasets, "_VERIFIED", set())
    verify_file(path, spec)  # on-disk record, as a new process would see it
    assert hashed == [path], "a verified, unchanged file was hashed again"


def test_changed_file_is_hashed_again(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 10
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    spec = _spec_for(blob, algorithm="md5")
    verify_file(path, spec)
    _flip_byte(path, 7)  # same size, new mtime: the record no longer applies
    with pytest.raises(DatasetFileError, match="found md5:") as info:
        verify_file(path, spec)
    message = str(info.value)
    assert str(path) in message and spec.digest in message and "found md5:" in message


def test_wrong_size_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    spec = _spec_for(b"abcd")
    with pytest.raises(DatasetFileError, match="3 bytes instead of 4"):
        verify_file(path, spec)


def test_corrupt_real_file_names_file_and_checksum(tmp_path: Path, shared_data_dir: Path) -> None:
    folder = tmp_path / "mnist"
    shutil.copytree(shared_data_dir / "mnist", folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    _flip_byte(target, 1000)
    expected = datasets.FILE_SPECS["mnist"][target.name].digest
    before = sorted((str(p.relative_to(tmp_path)), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(DatasetFileError, match="found sha256:") as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert str(target) in message and expected in message and "found sha256:" in message
    assert "ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz" in message
    after = sorted((str(p.relative_to(tmp_path)), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written into (or renamed inside) the data dir


def test_missing_file_without_download_gives_url_hint(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileError, match=r"train-images-idx3-ubyte\.gz") as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz" in message
    assert "--data-dir" in message and "RETAIN_DATA_DIR" in message
    assert datasets.FILE_SPECS["mnist"]["train-images-idx3-ubyte.gz"].digest in message


def test_missing_fashion_and_cifar_hints(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileError, match=r"fashion-mnist\.s3-website\.eu-central-1\.amazonaws\.com"):
        load_dataset("fashion-mnist", tmp_path, download=False)
    with pytest.raises(DatasetFileError, match=r"www\.cs\.toronto\.edu/~kriz/cifar-100-python\.tar\.gz"):
        load_dataset("cifar100", tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# download


def test_download_from_file_url(tmp_path: Path) -> None:
    blob = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # several read chunks
    source = tmp_path / "server" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(blob)
    spec = _spec_for(blob, urls=(source.as_uri(),))
    dest = tmp_path / "data" / "sub" / "blob.bin"
    assert download_file(spec, dest, progress=False) == dest.absolute()
    assert dest.read_bytes() == blob
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]  # no temporary file left


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, on_read=None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.on_read = on_read

    def read(self, n: int = -1) -> bytes:
        if self.on_read is not None:
            self.on_read()
        return super().read(n)


def test_download_tries_mirror_then_fallback_and_renames_atomically(tmp_path: Path) -> None:
    blob = b"payload" * 5000
    spec = _spec_for(blob, urls=("https://mirror.invalid/blob.bin", "http://origin.invalid/blob.bin"))
    dest = tmp_path / "blob.bin"
    seen: list[str] = []

    def while_reading() -> None:  # mid-download: only a temporary file exists
        assert not dest.exists()
        assert any(p.name.endswith(".part") for p in tmp_path.iterdir())

    def opener(url: str, timeout: float):
        seen.append(url)
        if "mirror" in url:
            raise urllib.error.URLError("mirror down")
        return _FakeResponse(blob, while_reading)

    download_file(spec, dest, opener=opener, progress=False)
    assert seen == list(spec.urls)
    assert dest.read_bytes() == blob
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


@pytest.mark.parametrize("served", [b"x" * 100, b"y" * 99, b"x" * 101 + b"more"])
def test_corrupt_download_is_rejected_and_not_kept(tmp_path: Path, served: bytes) -> None:
    spec = _spec_for(b"x" * 100, urls=("https://a.invalid/f", "https://b.invalid/f"))
    if served == b"x" * 100:
        served = b"x" * 99 + b"z"  # right size, wrong checksum
    dest = tmp_path / "f"
    with pytest.raises(DatasetFileError, match=r"https://a\.invalid/f") as info:
        download_file(spec, dest, opener=lambda url, timeout: _FakeResponse(served), progress=False)
    message = str(info.value)
    assert "https://a.invalid/f" in message and "https://b.invalid/f" in message
    assert spec.digest in message
    assert list(tmp_path.iterdir()) == []


def test_network_failure_names_urls(tmp_path: Path, monkeypatch) -> None:
    def offline(url: str, timeout: float):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(datasets, "urlopen", offline)
    with pytest.raises(DatasetFileError, match="no route to host") as info:
        load_dataset("fashion-mnist", tmp_path, download=True)
    message = str(info.value)
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in message
    assert "no route to host" in message
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_load_dataset_downloads_real_mnist_from_file_urls(tmp_path: Path, shared_data_dir: Path,
                                                           monkeypatch) -> None:
    for name, spec in datasets.FILE_SPECS["mnist"].items():
        local = (shared_data_dir / "mnist" / name).as_uri()
        monkeypatch.setitem(datasets.FILE_SPECS["mnist"], name,
                            replace(spec, urls=("https://mirror.invalid/" + name, local)))
    real_urlopen = datasets.urlopen

    def opener(url: str, timeout: float):
        if "invalid" in url:
            raise urllib.error.URLError("unreachable mirror")
        return real_urlopen(url, timeout=timeout)

    monkeypatch.setattr(datasets, "urlopen", opener)
    splits = load_dataset("mnist", tmp_path / "data", download=True)
    assert splits.train_inputs.shape == (60000, 1, 28, 28)
    got = sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir())
    assert got == sorted(MNIST_FILES)


# --------------------------------------------------------------------------------------------------
# IDX format


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "i.gz", 2051, (2, 3, 4), images.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz", 2051), images)
    _write_idx(tmp_path / "l.gz", 2049, (3,), b"\x01\x02\x03")
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz", 2049), [1, 2, 3])


@pytest.mark.parametrize(
    ("magic", "dims", "payload", "match"),
    [
        (2049, (2, 3, 4), bytes(24), "magic number 2049, expected 2051"),
        (2051, (2, 3, 4), bytes(23), "announces 24 bytes"),
        (2051, (2, 3, 4), bytes(25), "unexpected bytes after"),
        (2051, (2,), b"", "truncated IDX header"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, magic, dims, payload, match) -> None:
    path = tmp_path / "bad-idx3.gz"
    _write_idx(path, magic, dims, payload)
    with pytest.raises(DatasetFileError, match=match) as info:
        read_idx(path, 2051)
    assert str(path) in str(info.value)


def test_read_idx_rejects_non_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetFileError, match="cannot decompress"):
        read_idx(path, 2049)


# --------------------------------------------------------------------------------------------------
# decoded cache


def test_decoded_cache_is_used_and_repaired(shared_data_dir: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    first = load_dataset("mnist", shared_data_dir)
    cached = sorted((tmp_path / "cache" / "decoded").glob("mnist-*.npy"))
    assert len(cached) == 4

    real_read_idx = datasets.read_idx

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(datasets, "read_idx", fail)
    second = load_dataset("mnist", shared_data_dir)
    assert torch.equal(first.train_inputs, second.train_inputs)
    assert torch.equal(first.test_targets, second.test_targets)

    # a damaged cache file is ignored and rewritten
    train_inputs = next(p for p in cached if p.name.endswith("train_inputs.npy"))
    train_inputs.write_bytes(train_inputs.read_bytes()[:1000])
    monkeypatch.setattr(datasets, "read_idx", real_read_idx)
    third = load_dataset("mnist", shared_data_dir)
    assert torch.equal(first.train_inputs, third.train_inputs)
    assert train_inputs.stat().st_size > 47_000_000


def test_unwritable_download_folder_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    spec = _spec_for(b"abc")
    with pytest.raises(DatasetFileError, match="not writable") as info:
        download_file(spec, blocker / "sub" / "blob.bin", opener=lambda url, timeout: _FakeResponse(b"abc"))
    assert "RETAIN_DATA_DIR" in str(info.value)
