"""The state folder: what one update hands to the next, written atomically, read without pickle.

A state folder holds JSON and safetensors files only, listed with their sha256 and size in
``manifest.json``. It is written into a hidden temporary sibling folder, flushed to disk, and
renamed into place, so a crash leaves either the old folder or the complete new one. Reading
checks the manifest's schema and format version, that every listed file is a plain name inside
the folder, that no file is missing or unexpected, and every checksum, before any tensor is
parsed. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

FORMAT_NAME = "retain-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"^[a-z][a-z0-9_]*\.(json|safetensors)$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_MAX_MANIFEST_BYTES = 16 * 2**20
_MANIFEST_KEYS = {
    "format": str,
    "format_version": int,
    "retain_version": str,
    "method": str,
    "model": dict,
    "method_options": dict,
    "options": dict,
    "updates_done": int,
    "task_ids_seen": list,
    "files": dict,
}


class StateError(RuntimeError):
    """A state folder is missing, corrupt, hostile, or belongs to another method or model."""


class StateLockedError(StateError):
    """Another update is writing the same output state folder."""


# Files whose names start with this prefix are "mapped files" (the joint baseline's data chunks):
# verified by a streaming hash and never held in memory; ``StateFolder.mapped_file`` hands out
# their path for memory-mapped reading, and ``write_state(linked_files=...)`` reuses them in a
# later state by hard link (copy across filesystems) without rewriting them.
MAPPED_PREFIX = "chunk_"
_HASH_BLOCK = 2**20
# In-process record of mapped files already hashed: (st_dev, st_ino, st_size, st_mtime_ns) -> sha256.
# An inode is recorded only when its mtime was >= _SETTLED_NS older than the start of its hash, so
# that any later write to it (which sets mtime to a later time on a local filesystem, whose
# timestamp granularity is <= 10 ms) changes the key. Set ``VERIFY_MAPPED_EVERY_TIME = True`` to
# hash every mapped file at every load regardless.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}
_SETTLED_NS = 1_000_000_000
VERIFY_MAPPED_EVERY_TIME = False


def is_mapped_file(name: str) -> bool:
    """Whether ``name`` is a mapped state file (verified streaming, read by memory map)."""
    return name.startswith(MAPPED_PREFIX) and name.endswith(".safetensors")


@dataclass(frozen=True)
class LinkedFile:
    """A verified file of a state folder that another state may reuse without rewriting it.

    ``identity`` is ``(st_dev, st_ino, st_size, st_mtime_ns)`` of the file when its sha256 was
    verified (or written): a hard link with the same identity is the same bytes.
    """

    path: Path
    sha256: str
    bytes: int
    identity: tuple[int, int, int, int]


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """``(st_dev, st_ino, st_size, st_mtime_ns)``: what ``LinkedFile.identity`` compares."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hash_open_file(f: Any) -> str:
    h = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    while n := f.readinto(view):
        h.update(view[:n])
    return h.hexdigest()


def _verify_mapped(path: Path, entry: dict[str, Any]) -> LinkedFile:
    """Streaming size + sha256 check of a mapped file (skipped for an inode already verified in
    this process, see ``_VERIFIED``); the file's bytes are not kept."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        identity = file_identity(before)
        if before.st_size != entry["bytes"]:
            raise StateError(
                f"{path}: size mismatch (the manifest says {entry['bytes']} bytes, the file has {before.st_size}); "
                "the file is truncated, corrupt or was edited"
            )
        if not VERIFY_MAPPED_EVERY_TIME and _VERIFIED.get(identity) == entry["sha256"]:
            return LinkedFile(path, entry["sha256"], entry["bytes"], identity)
        started = time.time_ns()
        digest = _hash_open_file(f)
        if file_identity(os.fstat(f.fileno())) != identity:
            raise StateError(f"{path}: the file changed while its checksum was being verified")
    if digest != entry["sha256"]:
        raise StateError(
            f"{path}: checksum mismatch (expected sha256 {entry['sha256']}, found {digest}); "
            "the file is corrupt or was edited"
        )
    if started - before.st_mtime_ns >= _SETTLED_NS:
        _VERIFIED[identity] = digest
    return LinkedFile(path, digest, entry["bytes"], identity)


def _place_linked(source: LinkedFile, target: Path) -> None:
    """Puts ``source`` at ``target`` by hard link (a copy where linking fails, e.g. across
    filesystems) and checks that it holds the bytes the manifest will list: a link whose identity
    equals the one verified is the same inode, unwritten since, so it is trusted without reading
    it; anything else (a copy, or a source touched since) is hashed while it is placed."""
    try:
        os.link(source.path, target)
    except OSError:
        h = hashlib.sha256()
        size = 0
        try:
            with open(source.path, "rb") as src, open(target, "xb") as dst:
                buffer = bytearray(_HASH_BLOCK)
                view = memoryview(buffer)
                while n := src.readinto(view):
                    h.update(view[:n])
                    dst.write(view[:n])
                    size += n
                dst.flush()
                os.fsync(dst.fileno())
        except FileNotFoundError:
            raise StateError(f"{source.path}: a file the new state reuses is missing") from None
        digest = h.hexdigest()
    else:
        if file_identity(os.stat(target)) == source.identity:
            return
        with open(target, "rb") as f:
            size, digest = os.fstat(f.fileno()).st_size, _hash_open_file(f)
    if size != source.bytes or digest != source.sha256:
        raise StateError(
            f"{source.path}: the file the new state reuses was altered since it was verified "
            f"(expected sha256 {source.sha256} and {source.bytes} bytes, found {digest} and {size} bytes)"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(data: bytes, where: str | Path) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting; StateError naming ``where``."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StateError(f"{where} is not valid JSON: {err}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_state(
    folder: str | Path,
    manifest: dict[str, Any],
    json_files: dict[str, Any],
    tensor_files: dict[str, dict[str, torch.Tensor]],
    linked_files: dict[str, LinkedFile] | None = None,
) -> Path:
    """Writes a complete state folder atomically (replacing an existing one only when complete).

    ``manifest`` gets ``format``, ``format_version`` and ``files`` filled in here.
    ``linked_files`` maps names to verified files of other state folders that the new state
    reuses: they are hard-linked (copied across filesystems) into the temporary folder before the
    rename and listed with their known sha256 and size, so reusing them costs no rewrite.
    """
    linked_files = dict(linked_files or {})
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    payloads: dict[str, bytes] = {}
    for name, obj in json_files.items():
        payloads[name] = _json_bytes(obj)
    for name, tensors in tensor_files.items():
        payloads[name] = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    for name in [*payloads, *linked_files]:
        if not _FILE_NAME.match(name) or name == MANIFEST:
            raise ValueError(f"invalid state file name {name!r}")
    both = sorted(set(payloads) & set(linked_files))
    if both:
        raise ValueError(f"state files given both as contents and as linked files: {both}")
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    files = {n: {"sha256": _sha256(b), "bytes": len(b)} for n, b in payloads.items()}
    files.update({n: {"sha256": f.sha256, "bytes": f.bytes} for n, f in linked_files.items()})
    manifest["files"] = dict(sorted(files.items()))
    _validate_manifest(manifest, folder)

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    old: Path | None = None
    try:
        for name, data in payloads.items():
            _write_file(tmp / name, data)
        for name, source in linked_files.items():
            _place_linked(source, tmp / name)
        _write_file(tmp / MANIFEST, _json_bytes(manifest))
        _fsync_dir(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.rename(old, folder)  # the new folder did not take its place: put the previous state back
        raise
    return folder


def remove_stale_temporaries(folder: str | Path) -> None:
    """Deletes temporary folders left by killed writers of ``folder`` (call under its lock)."""
    folder = Path(folder).absolute()
    if not folder.parent.exists():
        return
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for stale in folder.parent.glob(pattern):
            if pattern.endswith("old-*") and not folder.exists():
                # A kill between the two renames: the old folder is the last complete state.
                os.rename(stale, folder)
                continue
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def lock_output_folder(folder: str | Path) -> Iterator[None]:
    """Holds an exclusive lock for writing ``folder``; a second writer fails at once."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateLockedError(
                    f"another update is writing the state folder {folder} (lock {lock_path} is held)"
                ) from None
            raise
        remove_stale_temporaries(folder)
        yield
    finally:
        os.close(fd)


def _validate_manifest(manifest: Any, folder: Path) -> None:
    where = folder / MANIFEST
    if not isinstance(manifest, dict):
        raise StateError(f"{where}: the manifest must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise StateError(f"{where}: not a retain state folder (format is {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StateError(f"{where}: format_version must be an integer, got {version!r}")
    if version < 1:
        raise StateError(f"{where}: format_version must be >= 1, got {version}")
    if version > FORMAT_VERSION:
        raise StateError(
            f"{where}: format_version {version} is newer than this retain understands ({FORMAT_VERSION}); "
            "upgrade retain to read it"
        )
    unknown = set(manifest) - set(_MANIFEST_KEYS)
    missing = set(_MANIFEST_KEYS) - set(manifest)
    if unknown or missing:
        raise StateError(f"{where}: unexpected keys {sorted(unknown)}, missing keys {sorted(missing)}")
    for key, kind in _MANIFEST_KEYS.items():
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{where}: {key!r} must be of type {kind.__name__}, got {type(value).__name__}")
    for name, entry in manifest["files"].items():
        if not _FILE_NAME.match(name) or name == MANIFEST:
            raise StateError(f"{where}: file name {name!r} is not a plain state file name inside the folder")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"sha256", "bytes"}
            or not isinstance(entry["sha256"], str)
            or not isinstance(entry["bytes"], int)
        ):
            raise StateError(f"{where}: entry for {name!r} must be {{'sha256': str, 'bytes': int}}")
    model = manifest["model"]
    if set(model) != {"class", "hyperparameters", "task_ids"}:
        raise StateError(f"{where}: 'model' must have keys class, hyperparameters, task_ids")
    if not isinstance(model["class"], str) or not isinstance(model["hyperparameters"], dict):
        raise StateError(f"{where}: model class must be a string and hyperparameters an object")
    for key, ids in (("model.task_ids", model["task_ids"]), ("task_ids_seen", manifest["task_ids_seen"])):
        if not isinstance(ids, list) or not all(isinstance(t, str) and _TASK_ID.match(t) for t in ids):
            raise StateError(f"{where}: {key} must be a list of task ids (letters, digits, '_', '-'), got {ids!r}")
    if manifest["updates_done"] < 0:
        raise StateError(f"{where}: updates_done must be >= 0, got {manifest['updates_done']}")


class StateFolder:
    """A verified state folder: every file's bytes are read once and checked against the manifest.

    Mapped files (``is_mapped_file``) are hashed streaming instead and not kept in memory; their
    verified path is handed out by ``mapped_file``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise StateError(f"state folder {self.path} does not exist or is not a folder")
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists() and not manifest_path.is_symlink():
            raise StateError(f"{manifest_path} is missing: not a complete retain state folder")
        if manifest_path.is_symlink() or not manifest_path.is_file():
            raise StateError(f"{manifest_path}: must be a regular file")
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise StateError(f"{manifest_path}: larger than {_MAX_MANIFEST_BYTES} bytes, not a manifest")
        manifest = parse_json(manifest_path.read_bytes(), manifest_path)
        _validate_manifest(manifest, self.path)
        self.manifest: dict[str, Any] = manifest
        present = {p.name for p in self.path.iterdir()}
        listed = set(manifest["files"])
        missing = listed - present
        unexpected = present - listed - {MANIFEST}
        if missing:
            raise StateError(f"{self.path}: files listed in the manifest are missing: {sorted(missing)}")
        if unexpected:
            raise StateError(f"{self.path}: unexpected files not listed in the manifest: {sorted(unexpected)}")
        self._payloads: dict[str, bytes] = {}
        self._mapped: dict[str, LinkedFile] = {}
        for name, entry in manifest["files"].items():
            path = self.path / name
            if path.is_symlink() or not path.is_file():
                raise StateError(f"{path}: must be a regular file")
            if is_mapped_file(name):
                self._mapped[name] = _verify_mapped(path, entry)
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise StateError(
                    f"{path}: size mismatch (the manifest says {entry['bytes']} bytes, the file has {size}); "
                    "the file is truncated, corrupt or was edited"
                )
            data = path.read_bytes()
            if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
                raise StateError(
                    f"{path}: checksum mismatch (expected sha256 {entry['sha256']} and {entry['bytes']} bytes, "
                    f"found {_sha256(data)} and {len(data)} bytes); the file is corrupt or was edited"
                )
            self._payloads[name] = data

    def has(self, name: str) -> bool:
        return name in self._payloads or name in self._mapped

    def mapped_file(self, name: str) -> LinkedFile:
        """The verified path, sha256, size and identity of mapped file ``name``: open it by memory
        map (checking the identity of what was opened) or pass it to ``write_state(linked_files=)``."""
        if name not in self._mapped:
            raise StateError(f"{self.path}: {name} is missing (not a mapped file of this state)")
        return self._mapped[name]

    def json(self, name: str) -> Any:
        if name not in self._payloads:
            raise StateError(f"{self.path}: {name} is missing")
        return parse_json(self._payloads[name], self.path / name)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._mapped:
            raise StateError(f"{self.path / name} is a mapped file: read it through mapped_file()")
        try:
            return load_safetensors_bytes(self._payloads[name])
        except KeyError:
            raise StateError(f"{self.path}: {name} is missing") from None
        except Exception as err:  # safetensors raises its own error types on malformed headers
            raise StateError(f"{self.path / name} is not a valid safetensors file: {err}") from None


# ------------------------------------------------------------------------------------------------
# Content checks used when a state is loaded (after the checksums): each raises StateError naming
# the file and the problem.
# ------------------------------------------------------------------------------------------------
_JSON_SCALARS = (str, int, float, bool, type(None))


def check_json_like(value: Any, template: Any, where: str | Path, key: str = "") -> None:
    """``value`` has the keys and value types of ``template`` (what the reader itself would
    write): objects the same keys, ints ints, strings strings; elements of an empty template list
    must be strings (the lists in retain's JSON state are task ids)."""
    at = f" at {key!r}" if key else ""

    def fail(expected: str) -> StateError:
        return StateError(f"{where}: expected {expected}{at}, got {type(value).__name__} {str(value)[:60]!r}")

    if isinstance(template, dict):
        if not isinstance(value, dict):
            raise fail("an object")
        unknown, missing = sorted(set(value) - set(template)), sorted(set(template) - set(value))
        if unknown or missing:
            raise StateError(f"{where}: unknown keys {unknown}, missing keys {missing}{at}")
        for k, t in template.items():
            check_json_like(value[k], t, where, f"{key}.{k}" if key else k)
    elif isinstance(template, list):
        if not isinstance(value, list):
            raise fail("a list")
        for i, item in enumerate(value):
            check_json_like(item, template[0] if template else "", where, f"{key}[{i}]")
    elif isinstance(template, bool):
        if not isinstance(value, bool):
            raise fail("a boolean")
    elif isinstance(template, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise fail("an integer")
    elif isinstance(template, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise fail("a number")
    elif isinstance(template, str):
        if not isinstance(value, str):
            raise fail("a string")
    elif not isinstance(value, _JSON_SCALARS):
        raise fail("a JSON scalar")


def check_memory_json(meta: Any, memory_size: int, where: str | Path) -> None:
    """memory.json: exactly ``memory_size`` (this memory's), ``seen`` >= 0 and sorted unique column names."""
    check_json_like(meta, {"memory_size": 0, "seen": 0, "metadata_names": []}, where)
    if meta["memory_size"] != memory_size:
        raise StateError(f"{where}: the state holds a memory of size {meta['memory_size']}, this one has {memory_size}")
    if meta["seen"] < 0:
        raise StateError(f"{where}: seen must be >= 0, got {meta['seen']}")
    names = meta["metadata_names"]
    if names != sorted(set(names)) or not all(re.match(r"^[A-Za-z0-9_]+$", n) for n in names):
        raise StateError(f"{where}: metadata_names must be sorted unique identifiers, got {names!r}")


def check_memory_tensors(tensors: dict[str, torch.Tensor], num_classes: int, where: str | Path) -> None:
    """memory.safetensors: a uint8 generator state, finite inputs and metadata, 1-D integer
    targets in ``[0, num_classes)`` (an out-of-range label would crash a GPU kernel later)."""
    state = tensors.get("generator_state")
    if state is None or state.dtype != torch.uint8 or state.dim() != 1:
        raise StateError(f"{where}: generator_state must be a 1-D uint8 tensor")
    targets = tensors.get("targets")
    if targets is not None:
        if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise StateError(
                f"{where}: targets must be a 1-D integer tensor, got {targets.dtype} {tuple(targets.shape)}"
            )
        if targets.numel() and num_classes and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise StateError(f"{where}: targets must lie in [0, {num_classes - 1}]")
    for name, value in tensors.items():
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise StateError(f"{where}: {name} contains NaN or Inf")


def check_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str | Path) -> None:
    """model.safetensors: the model's tensor names, shapes and dtypes exactly, all finite."""
    expected = model.state_dict()
    unknown, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
    if unknown or missing:
        raise StateError(f"{where} does not fit the model: unexpected tensors {unknown}, missing tensors {missing}")
    for name, value in weights.items():
        ref = expected[name]
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise StateError(
                f"{where}: tensor {name!r} is {value.dtype} {tuple(value.shape)}, the model needs "
                f"{ref.dtype} {tuple(ref.shape)}"
            )
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise StateError(f"{where}: tensor {name!r} contains NaN or Inf")


def check_tensors_roundtrip(
    loaded: dict[str, torch.Tensor], resaved: dict[str, torch.Tensor], where: str | Path
) -> None:
    """After loading, saving again gives the same tensor names, dtypes and shapes (nothing in the
    file was ignored or silently converted), and no floating-point tensor holds NaN or Inf."""
    if set(loaded) != set(resaved):
        raise StateError(
            f"{where}: unexpected tensors {sorted(set(loaded) - set(resaved))}, "
            f"missing tensors {sorted(set(resaved) - set(loaded))}"
        )
    for name, value in loaded.items():
        ref = resaved[name]
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise StateError(
                f"{where}: tensor {name!r} is {value.dtype} {tuple(value.shape)}, "
                f"expected {ref.dtype} {tuple(ref.shape)}"
            )
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise StateError(f"{where}: tensor {name!r} contains NaN or Inf")
