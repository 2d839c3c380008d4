"""Load image-classification datasets as in-memory tensors, from verified original files.

Supported: ``digits`` (scikit-learn, no files), ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``.
Each file is checked against the official checksum before it is read, so a run can never train on a
truncated or tampered download. Files are read in their original distribution format (IDX gz, CIFAR
python tarballs); the CIFAR pickles are read with a restricted unpickler that cannot run code.

Two small caches make repeated loads fast (both under ``RETAIN_CACHE_DIR``, default
``~/.cache/retain/cache``; the data folder itself is never written to, so it may be read-only):

* ``verified/``: one JSON record per checked file (path, size, mtime, digest); a file whose size and
  mtime are unchanged is not hashed again.
* ``decoded/``: the decoded arrays as ``.npy`` files (loaded with ``allow_pickle=False``), named by the
  checksums of the source files they came from.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from retain.state import replace_file

__all__ = [
    "DATASET_NAMES",
    "FILE_SPECS",
    "DatasetFileError",
    "FileSpec",
    "TensorSplits",
    "cache_dir",
    "download_file",
    "load_dataset",
    "read_cifar_tarball",
    "read_idx",
    "resolve_data_dir",
    "safe_unpickle",
    "verify_file",
]

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")

DATA_DIR_ENV = "RETAIN_DATA_DIR"
CACHE_DIR_ENV = "RETAIN_CACHE_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/retain/data")
DEFAULT_CACHE_DIR = Path("~/.cache/retain/cache")

# The URL opener used for downloads. Tests (or users behind a proxy) may replace it, e.g. with
# ``monkeypatch.setattr(datasets, "urlopen", fake)``; it is looked up at call time.
urlopen: Callable[..., Any] = urllib.request.urlopen
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_CACHE_FORMAT = "v1"


class DatasetFileError(RuntimeError):
    """A dataset file is missing, corrupt, malformed, or could not be downloaded."""


@dataclass(frozen=True)
class FileSpec:
    """One official dataset file: its name, size in bytes, checksum and where to download it."""

    name: str
    size: int
    algorithm: str  # "sha256" or "md5"
    digest: str
    urls: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """The expected checksum as ``algorithm:hex``."""
        return f"{self.algorithm}:{self.digest}"


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _idx_specs(bases: tuple[str, ...], table: Mapping[str, tuple[int, str]]) -> dict[str, FileSpec]:
    return {
        name: FileSpec(name, size, "sha256", digest, tuple(base + name for base in bases))
        for name, (size, digest) in table.items()
    }


# Official files: sizes and SHA-256 of MNIST / Fashion-MNIST as distributed by their authors (the
# same bytes as shared/data/SHA256SUMS); CIFAR: the md5 published on the CIFAR page.
FILE_SPECS: dict[str, dict[str, FileSpec]] = {
    "mnist": _idx_specs(
        _MNIST_MIRRORS,
        {
            "train-images-idx3-ubyte.gz": (
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            "train-labels-idx1-ubyte.gz": (
                28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            "t10k-images-idx3-ubyte.gz": (
                1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        },
    ),
    "fashion-mnist": _idx_specs(
        (_FASHION_MNIST_URL,),
        {
            "train-images-idx3-ubyte.gz": (
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            "train-labels-idx1-ubyte.gz": (
                29515,
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            "t10k-images-idx3-ubyte.gz": (
                4422102,
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                5148,
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        },
    ),
    "cifar10": {
        "cifar-10-python.tar.gz": FileSpec(
            "cifar-10-python.tar.gz",
            170498071,
            "md5",
            "c58f30108f718f92721af3b95e74349a",
            (_CIFAR_URL + "cifar-10-python.tar.gz",),
        )
    },
    "cifar100": {
        "cifar-100-python.tar.gz": FileSpec(
            "cifar-100-python.tar.gz",
            169001437,
            "md5",
            "eb9058c3a382ffc7106e4002c42a8d85",
            (_CIFAR_URL + "cifar-100-python.tar.gz",),
        )
    },
}

# Sub-folder of the data dir holding each dataset's files (CIFAR tarballs may also sit in data_dir).
DATASET_FOLDERS: dict[str, str] = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}


@dataclass(frozen=True)
class _Meta:
    num_classes: int
    input_shape: tuple[int, ...]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Per-channel mean/std in [0, 1] units: the values in common use (MNIST, CIFAR), otherwise computed
# on the training set (Fashion-MNIST) or on the whole set (digits).
_META: dict[str, _Meta] = {
    "digits": _Meta(10, (1, 8, 8), 16.0, (0.3053,), (0.3760,)),
    "mnist": _Meta(10, (1, 28, 28), 255.0, (0.1307,), (0.3081,)),
    "fashion-mnist": _Meta(10, (1, 28, 28), 255.0, (0.2860,), (0.3530,)),
    "cifar10": _Meta(10, (3, 32, 32), 255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Meta(100, (3, 32, 32), 255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class TensorSplits:
    """A dataset held in memory: train/test inputs in their source dtype (N, C, H, W) and int64 targets.

    ``scale`` maps the stored values to [0, 1] (``inputs / scale``); ``mean``/``std`` are per channel in
    those [0, 1] units.
    """

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            inputs: Tensor = getattr(self, f"{split}_inputs")
            targets: Tensor = getattr(self, f"{split}_targets")
            if tuple(inputs.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"{split}_inputs has item shape {tuple(inputs.shape[1:])}, "
                                 f"expected {tuple(self.input_shape)}")
            if targets.dtype != torch.int64 or targets.ndim != 1 or len(targets) != len(inputs):
                raise ValueError(f"{split}_targets must be int64 of shape ({len(inputs)},), got "
                                 f"{targets.dtype} {tuple(targets.shape)}")
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have one value per channel")

    def __repr__(self) -> str:
        return (
            f"TensorSplits(name={self.name!r}, train={len(self.train_inputs)}, test={len(self.test_inputs)}, "
            f"input_shape={self.input_shape}, dtype={self.train_inputs.dtype}, "
            f"num_classes={self.num_classes}, scale={self.scale})"
        )


# --------------------------------------------------------------------------------------------------
# Locations


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: the argument, else ``$RETAIN_DATA_DIR``, else ``~/.cache/retain/data``."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def cache_dir() -> Path:
    """Where verification records and decoded arrays go: ``$RETAIN_CACHE_DIR``, else ~/.cache/retain/cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _how_to_get(dataset: str, spec: FileSpec, dest: Path) -> str:
    urls = " or ".join(spec.urls)
    folder = DATASET_FOLDERS[dataset]
    return (
        f"Get it from {urls} and save it as {dest} (or load with download=True), or point to a folder "
        f"holding {folder}/{spec.name} with --data-dir or ${DATA_DIR_ENV}."
    )


def _candidates(dataset: str, spec: FileSpec, root: Path) -> list[Path]:
    paths = [root / DATASET_FOLDERS[dataset] / spec.name]
    if dataset.startswith("cifar"):
        paths.append(root / spec.name)
    return paths


# --------------------------------------------------------------------------------------------------
# Verification


_VERIFIED: set[tuple[str, int, int, str]] = set()


def _hash_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    key = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:24]
    return cache_dir() / "verified" / f"{key}.json"


def _remember_verified(path: Path, st: os.stat_result, spec: FileSpec) -> None:
    _VERIFIED.add((str(path), st.st_size, st.st_mtime_ns, spec.checksum))
    record = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "checksum": spec.checksum}
    try:
        record_file = _record_path(path)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        replace_file(record_file, lambda f: f.write(json.dumps(record).encode("utf-8")))
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        logger.debug("could not write verification record for %s: %s", path, exc)


def _known_verified(path: Path, st: os.stat_result, spec: FileSpec) -> bool:
    if (str(path), st.st_size, st.st_mtime_ns, spec.checksum) in _VERIFIED:
        return True
    try:
        record = json.loads(_record_path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    expected = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "checksum": spec.checksum}
    if record != expected:
        return False
    _VERIFIED.add((str(path), st.st_size, st.st_mtime_ns, spec.checksum))
    return True


def verify_file(path: str | Path, spec: FileSpec, dataset: str | None = None) -> None:
    """Check a file's size and checksum against ``spec``; raise :class:`DatasetFileError` if they differ.

    The result is remembered per (path, size, mtime), in this process and in a record on disk.
    """
    path = Path(path).absolute()
    if dataset in DATASET_FOLDERS:
        hint = _how_to_get(dataset, spec, path)
    else:
        hint = f"Get it from {' or '.join(spec.urls)}."
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetFileError(
            f"Dataset file {path} is missing (expected {spec.checksum}). {hint}"
        ) from None
    if _known_verified(path, st, spec):
        return
    if st.st_size != spec.size:
        found = f"{st.st_size} bytes instead of {spec.size}"
    else:
        digest = _hash_file(path, spec.algorithm)
        if digest == spec.digest:
            _remember_verified(path, st, spec)
            return
        found = f"{spec.algorithm}:{digest}"
    raise DatasetFileError(
        f"Dataset file {path} is corrupt: expected {spec.checksum} ({spec.size} bytes), found {found}. "
        f"Delete it and download it again. {hint}"
    )


# --------------------------------------------------------------------------------------------------
# Download


def _content_length(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def download_file(
    spec: FileSpec,
    dest: str | Path,
    opener: Callable[..., Any] | None = None,
    progress: bool = True,
) -> Path:
    """Download ``spec`` to ``dest``, trying each URL in turn, and verify it before it gets its real name.

    The bytes go to a temporary file in the destination folder that is renamed only once its size and
    checksum match, so ``dest`` never holds a partial or wrong file. ``opener`` defaults to the module's
    ``urlopen`` (``urllib.request.urlopen``).
    """
    dest = Path(dest).absolute()
    open_url = opener if opener is not None else urlopen
    problems: list[str] = []
    for url in spec.urls:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{spec.name}.", suffix=".part")
        except OSError as exc:
            raise DatasetFileError(
                f"Cannot download {spec.name}: the folder {dest.parent} is not writable ({exc}). Choose "
                f"another folder with --data-dir or ${DATA_DIR_ENV}, or get the file from "
                f"{' or '.join(spec.urls)} and save it as {dest}."
            ) from exc
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s from %s", spec.name, url)
            h = hashlib.new(spec.algorithm)
            size = 0
            with os.fdopen(fd, "wb") as out, open_url(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                total = _content_length(response) or spec.size
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.name,
                          disable=not progress, leave=False, mininterval=0.5) as bar:
                    while size <= spec.size and (chunk := response.read(_CHUNK)):
                        out.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if size != spec.size:
                problems.append(f"{url}: got {size}{'+' if size > spec.size else ''} bytes, "
                                f"expected {spec.size}")
                continue
            if h.hexdigest() != spec.digest:
                problems.append(f"{url}: checksum {spec.algorithm}:{h.hexdigest()}, expected {spec.checksum}")
                continue
            tmp.chmod(0o644)
            os.replace(tmp, dest)
            _remember_verified(dest, dest.stat(), spec)
            return dest
        except Exception as exc:  # network, HTTP, or file errors: try the next URL
            problems.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    tried = "; ".join(problems)
    raise DatasetFileError(
        f"Could not download {spec.name} to {dest} (expected {spec.checksum}, {spec.size} bytes). "
        f"Tried: {tried}. Download it by hand from {' or '.join(spec.urls)} and save it as {dest}, or "
        f"point to a folder that has it with --data-dir or ${DATA_DIR_ENV}."
    )


def _locate(dataset: str, spec: FileSpec, root: Path, download: bool) -> Path:
    """Find (or download) one file and verify it."""
    candidates = _candidates(dataset, spec, root)
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        dest = candidates[0].absolute()
        if not download:
            raise DatasetFileError(
                f"Dataset file {dest} is missing (expected {spec.checksum}) and download=False. "
                f"{_how_to_get(dataset, spec, dest)}"
            )
        return download_file(spec, dest)
    verify_file(path, spec, dataset)
    return path.absolute()


# --------------------------------------------------------------------------------------------------
# Readers


def _readinto_exact(f: BinaryIO, out: np.ndarray) -> int:
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (magic 2051: images, 2049: labels)."""
    path = Path(path)
    ndim = expected_magic & 0xFF
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) != 4 + 4 * ndim:
                raise DatasetFileError(f"{path}: truncated IDX header")
            magic, *dims = struct.unpack(f">{1 + ndim}I", header)
            if magic != expected_magic:
                raise DatasetFileError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
            out = np.empty(dims, dtype=np.uint8)
            got = _readinto_exact(f, out)
            if got != out.size:
                raise DatasetFileError(f"{path}: IDX header announces {out.size} bytes of data (dims "
                                       f"{dims}), file holds {got}")
            if f.read(1):
                raise DatasetFileError(f"{path}: unexpected bytes after the IDX data (dims {dims})")
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetFileError(f"{path}: cannot decompress: {exc}") from exc
    return out


def _read_idx_dataset(dataset: str, paths: Mapping[str, Path]) -> dict[str, np.ndarray]:
    meta = _META[dataset]
    arrays: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = paths[f"{prefix}-images-idx3-ubyte.gz"]
        labels_path = paths[f"{prefix}-labels-idx1-ubyte.gz"]
        images = read_idx(images_path, 2051)
        labels = read_idx(labels_path, 2049)
        if images.shape[1:] != meta.input_shape[1:]:
            raise DatasetFileError(f"{images_path}: images are {images.shape[1:]}, expected "
                                   f"{meta.input_shape[1:]}")
        if len(images) != len(labels):
            raise DatasetFileError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                                   f"{len(labels)} labels")
        arrays[f"{split}_inputs"] = images[:, None]
        arrays[f"{split}_targets"] = labels.astype(np.int64)
    return arrays


# The CIFAR batches are pickled dicts of bytes, ints, lists and numpy arrays. Unpickling may call any
# importable callable, so ``find_class`` refuses every global except the few numpy names that
# rebuilding a numpy array needs (``_reconstruct`` under its numpy 1.x and 2.x module names, ``ndarray``
# and ``dtype``); nothing else can be imported or called while reading.
def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can build plain containers and numpy arrays but imports nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_unpickle(data: bytes) -> Any:
    """Unpickle CIFAR-style data (Python 2 strings read as bytes) without importing arbitrary code."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _cifar_batch(
    blob: bytes, where: str, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = safe_unpickle(blob)
    except Exception as exc:
        raise DatasetFileError(f"{where}: cannot read the batch safely: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFileError(f"{where}: expected a dict with b'data' and {label_key!r}, got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFileError(f"{where}: b'data' must be uint8 (N, 3072), got {desc}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetFileError(f"{where}: {label_key!r} must hold {len(data)} integers, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFileError(f"{where}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_tarball(
    path: str | Path, folder: str, splits: Mapping[str, list[str]], label_key: bytes, num_classes: int
) -> dict[str, np.ndarray]:
    """Read the named batch members of a CIFAR python tarball in one streaming pass.

    ``splits`` maps ``train``/``test`` to member names under ``folder`` (e.g. ``cifar-10-batches-py``).
    Nothing is extracted to disk.
    """
    path = Path(path)
    wanted = {f"{folder}/{m}" for members in splits.values() for m in members}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    blobs[member.name] = f.read()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DatasetFileError(f"{path}: cannot read the tarball: {exc}") from exc
    missing = sorted(wanted - blobs.keys())
    if missing:
        raise DatasetFileError(f"{path}: missing members {missing}")
    arrays: dict[str, np.ndarray] = {}
    for split, members in splits.items():
        parts = [_cifar_batch(blobs[f"{folder}/{m}"], f"{path}:{folder}/{m}", label_key, num_classes)
                 for m in members]
        arrays[f"{split}_inputs"] = np.concatenate([p[0] for p in parts])
        arrays[f"{split}_targets"] = np.concatenate([p[1] for p in parts])
    return arrays


def _read_cifar(dataset: str, paths: Mapping[str, Path]) -> dict[str, np.ndarray]:
    (path,) = paths.values()
    if dataset == "cifar10":
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        return read_cifar_tarball(path, "cifar-10-batches-py", batches, b"labels", 10)
    return read_cifar_tarball(path, "cifar-100-python", {"train": ["train"], "test": ["test"]},
                              b"fine_labels", 100)


# --------------------------------------------------------------------------------------------------
# Decoded-array cache


_PARTS = ("train_inputs", "train_targets", "test_inputs", "test_targets")


def _check_arrays(dataset: str, arrays: Mapping[str, np.ndarray]) -> None:
    meta = _META[dataset]
    for split in ("train", "test"):
        x, y = arrays[f"{split}_inputs"], arrays[f"{split}_targets"]
        if x.dtype != np.uint8 or x.shape[1:] != meta.input_shape:
            raise ValueError(f"{split} inputs are {x.dtype} {x.shape}")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise ValueError(f"{split} targets are {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= meta.num_classes):
            raise ValueError(f"{split} targets outside 0..{meta.num_classes - 1}")


def _decoded(dataset: str, specs: Mapping[str, FileSpec], build: Callable[[], dict[str, np.ndarray]]
             ) -> dict[str, np.ndarray]:
    """Return the decoded arrays from the ``.npy`` cache, or build, check and cache them."""
    source = hashlib.sha256("\n".join(sorted(s.checksum for s in specs.values())).encode()).hexdigest()
    folder = cache_dir() / "decoded"
    files = {part: folder / f"{dataset}-{_CACHE_FORMAT}-{source[:20]}-{part}.npy" for part in _PARTS}
    if all(f.exists() for f in files.values()):
        try:
            arrays = {part: np.load(f, allow_pickle=False) for part, f in files.items()}
            _check_arrays(dataset, arrays)
            return arrays
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache for %s (%s); decoding again", dataset, exc)
    arrays = {part: np.ascontiguousarray(a) for part, a in build().items()}
    try:
        _check_arrays(dataset, arrays)
    except ValueError as exc:
        raise DatasetFileError(f"{dataset}: the decoded files are not valid: {exc}") from exc
    try:
        for part, f in files.items():
            f.parent.mkdir(parents=True, exist_ok=True)
            replace_file(f, lambda out, a=arrays[part]: np.save(out, a, allow_pickle=False))
    except OSError as exc:
        logger.debug("could not cache decoded %s: %s", dataset, exc)
    return arrays


# --------------------------------------------------------------------------------------------------
# Public entry point


def _load_digits() -> TensorSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images).astype(np.uint8)[:, None])
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(targets)), test_size=0.25, random_state=0,
                                           stratify=bunch.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    meta = _META["digits"]
    return TensorSplits("digits", images[train_idx], targets[train_idx], images[test_idx], targets[test_idx],
                        meta.num_classes, meta.input_shape, meta.scale, meta.mean, meta.std)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> TensorSplits:
    """Load a dataset by name as in-memory :class:`TensorSplits`, verifying (or downloading) its files.

    ``data_dir`` defaults to ``$RETAIN_DATA_DIR``, else ``~/.cache/retain/data``; files are looked for
    under ``data_dir/<dataset>/`` with their official names. Raises :class:`DatasetFileError` when a file
    is missing (and ``download`` is false or fails) or does not match its official checksum.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    if key == "digits":
        return _load_digits()
    root = resolve_data_dir(data_dir)
    specs = FILE_SPECS[key]
    paths = {fname: _locate(key, spec, root, download) for fname, spec in specs.items()}
    reader = _read_cifar if key.startswith("cifar") else _read_idx_dataset
    arrays = _decoded(key, specs, lambda: reader(key, paths))
    meta = _META[key]
    return TensorSplits(
        key,
        torch.from_numpy(arrays["train_inputs"]),
        torch.from_numpy(arrays["train_targets"]),
        torch.from_numpy(arrays["test_inputs"]),
        torch.from_numpy(arrays["test_targets"]),
        meta.num_classes,
        meta.input_shape,
        meta.scale,
        meta.mean,
        meta.std,
    )
