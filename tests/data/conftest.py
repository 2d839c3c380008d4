"""Fixtures for the data tests: an isolated cache, fake CIFAR tarballs (``shared_data_dir`` is in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retain.data import datasets

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _isolated_retain_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep caches out of the home folder and ignore a data dir set in the caller's environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(datasets.CACHE_DIR_ENV, str(tmp_path_factory.mktemp("retain-cache")))
        mp.delenv(datasets.DATA_DIR_ENV, raising=False)
        yield


# ---------------------------------------------------------------------------------------------------
# Python 2 style pickles, as in the original CIFAR batches (protocol 2, written by cPickle with numpy
# 1.x): strings are py2 `str` (SHORT_BINSTRING/BINSTRING), arrays go through
# numpy.core.multiarray._reconstruct. Python 3's own protocol 2 would use _codecs.encode instead.


def _py2_dump(obj: Any, out: bytearray) -> None:
    if obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)
        else:
            out += b"J" + struct.pack("<i", obj)
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _py2_dump(item, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for item in obj:
            _py2_dump(item, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for key, value in obj.items():
            _py2_dump(key, out)
            _py2_dump(value, out)
        out += b"u"
    elif isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8
        out += b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
        _py2_dump((0,), out)
        _py2_dump(b"b", out)
        out += b"\x87R("  # TUPLE3, REDUCE, then the state tuple
        _py2_dump(1, out)
        _py2_dump(tuple(obj.shape), out)
        out += b"cnumpy\ndtype\n"
        _py2_dump(b"u1", out)
        _py2_dump(0, out)
        _py2_dump(1, out)
        out += b"\x87R"
        _py2_dump((3, b"|", None, None, None, -1, -1, 0), out)
        out += b"b"  # BUILD the dtype
        _py2_dump(False, out)
        _py2_dump(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"  # end of state tuple, BUILD the array
    else:
        raise TypeError(type(obj))


def py2_pickle(obj: Any) -> bytes:
    """Pickle ``obj`` the way Python 2's cPickle wrote the CIFAR batches."""
    out = bytearray(b"\x80\x02")
    _py2_dump(obj, out)
    return bytes(out + b".")


@pytest.fixture
def py2_pickler() -> Callable[[Any], bytes]:
    return py2_pickle


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1244000000
    tar.addfile(info, io.BytesIO(data))


def write_cifar_tarball(
    path: Path,
    kind: str = "cifar10",
    per_batch: int = 12,
    n_test: int = 15,
    seed: int = 0,
    replace_member: dict[str, bytes | None] | None = None,
) -> dict[str, np.ndarray]:
    """Write a small tarball in the original CIFAR layout; return the arrays it holds.

    ``replace_member`` swaps the bytes of named members (e.g. a malicious ``data_batch_3``); ``None``
    leaves the member out.
    """
    rng = np.random.default_rng(seed)
    num_classes = 10 if kind == "cifar10" else 100
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if kind == "cifar10":
        batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    else:
        batches = {"train": 5 * per_batch, "test": n_test}
    members: dict[str, bytes | None] = {}
    arrays: dict[str, list[np.ndarray]] = {"train_inputs": [], "train_targets": [], "test_inputs": [],
                                           "test_targets": []}
    for name, n in batches.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
        filenames = [f"img_{name}_{i}.png".encode() for i in range(n)]
        if kind == "cifar10":
            batch = {b"batch_label": f"{name} of synthetic".encode(), b"labels": labels, b"data": data,
                     b"filenames": filenames}
        else:
            batch = {b"filenames": filenames, b"batch_label": f"{name} batch".encode(),
                     b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels], b"data": data}
        members[name] = py2_pickle(batch)
        split = "test" if "test" in name else "train"
        arrays[f"{split}_inputs"].append(data.reshape(-1, 3, 32, 32))
        arrays[f"{split}_targets"].append(np.array(labels, dtype=np.int64))
    meta_name = "batches.meta" if kind == "cifar10" else "meta"
    members[meta_name] = py2_pickle({b"label_names": [f"class{i}".encode() for i in range(num_classes)]})
    members["readme.html"] = b"<html>synthetic</html>"
    members.update(replace_member or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in members.items():
            if data is not None:
                _add_member(tar, f"{folder}/{name}", data)
    return {k: np.concatenate(v) for k, v in arrays.items()}


@pytest.fixture
def fake_cifar(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, np.ndarray]]:
    """Write a synthetic CIFAR tarball and register its real md5/size in the checksum table."""

    def make(path: Path, kind: str = "cifar10", **kwargs: Any) -> dict[str, np.ndarray]:
        arrays = write_cifar_tarball(path, kind, **kwargs)
        blob = path.read_bytes()
        name = path.name
        spec = replace(datasets.FILE_SPECS[kind][name], size=len(blob), digest=hashlib.md5(blob).hexdigest())
        monkeypatch.setitem(datasets.FILE_SPECS[kind], name, spec)
        return arrays

    return make
