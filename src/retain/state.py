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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

FORMAT_NAME = "retain-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"^[a-z][a-z0-9_]*\.(json|safetensors)$")
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


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
) -> Path:
    """Writes a complete state folder atomically (replacing an existing one only when complete).

    ``manifest`` gets ``format``, ``format_version`` and ``files`` filled in here.
    """
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    payloads: dict[str, bytes] = {}
    for name, obj in json_files.items():
        payloads[name] = _json_bytes(obj)
    for name, tensors in tensor_files.items():
        payloads[name] = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    for name in payloads:
        if not _FILE_NAME.match(name) or name == MANIFEST:
            raise ValueError(f"invalid state file name {name!r}")
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {n: {"sha256": _sha256(b), "bytes": len(b)} for n, b in sorted(payloads.items())}
    _validate_manifest(manifest, folder)

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, data in payloads.items():
            _write_file(tmp / name, data)
        _write_file(tmp / MANIFEST, _json_bytes(manifest))
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


class StateFolder:
    """A verified state folder: every file's bytes are read once and checked against the manifest."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise StateError(f"state folder {self.path} does not exist or is not a folder")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise StateError(f"{manifest_path} is missing: not a complete retain state folder")
        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateError(f"{manifest_path} is not valid JSON: {err}") from None
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
        for name, entry in manifest["files"].items():
            path = self.path / name
            if path.is_symlink() or not path.is_file():
                raise StateError(f"{path}: must be a regular file")
            data = path.read_bytes()
            if len(data) != entry["bytes"] or _sha256(data) != entry["sha256"]:
                raise StateError(
                    f"{path}: checksum mismatch (expected sha256 {entry['sha256']} and {entry['bytes']} bytes, "
                    f"found {_sha256(data)} and {len(data)} bytes); the file is corrupt or was edited"
                )
            self._payloads[name] = data

    def has(self, name: str) -> bool:
        return name in self._payloads

    def json(self, name: str) -> Any:
        try:
            return json.loads(self._payloads[name].decode("utf-8"))
        except KeyError:
            raise StateError(f"{self.path}: {name} is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateError(f"{self.path / name} is not valid JSON: {err}") from None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors_bytes(self._payloads[name])
        except KeyError:
            raise StateError(f"{self.path}: {name} is missing") from None
        except Exception as err:  # safetensors raises its own error types on malformed headers
            raise StateError(f"{self.path / name} is not a valid safetensors file: {err}") from None
