"""The state folder: what one update hands to the next, written atomically, read without pickle.

A state folder holds JSON and safetensors files only, listed with their sha256 and size in
``manifest.json``. It is written into a hidden temporary sibling folder, flushed to disk, and
renamed into place, so a crash leaves either the old folder or the complete new one.

Paths are guarded, because a state path that is not a state folder must never cost the user a file:
- retain writes only a path that does not exist or an existing retain state folder (a valid
  manifest and nothing but the files it lists); an output equal to, inside, or containing the
  input is refused (``check_output_path``), before anything is trained or read;
- the output's lock (``OutputLock``) is taken before the input is read and removed when the update
  ends; locks and leftovers are opened without following symlinks and matched by exact names;
- reading bounds every file before it reads it: the manifest and JSON files by size and nesting,
  tensor files by their header, which is parsed by this module (strict JSON, dtypes, shapes and
  offsets that tile the file exactly) before any tensor is allocated. Every file's checksum is
  verified by streaming before anything is used, and again as its tensors are read into their
  final buffers, so nothing holds a file's bytes. Nothing is ever unpickled.

Mapped files (``chunk_*.safetensors``, the joint baseline's data, and ``val_chunk_*.safetensors``,
the validation data of earlier updates) are verified by the same
streaming hash but never read into memory: ``StateFolder.mapped_file`` hands out their verified
path for memory-mapped reading, and ``write_state(linked_files=...)`` places them in a later state
by hard link (a copy where linking fails) instead of rewriting them. ``StateFolder(defer_mapped=
True)`` checks their sizes at load and leaves the hash to a background thread
(``verify_mapped_in_background``), which its caller joins before relying on them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT_NAME = "retain-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILE_NAME = re.compile(r"[a-z][a-z0-9_]*\.(json|safetensors)")
TASK_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 64 * 2**20
MAX_TASK_IDS = 100_000
MAX_HYPERPARAMETER_VALUES = 4096  # numbers, strings and containers in the model's constructor arguments
_CHUNK = 8 * 2**20  # bytes per read of a file into a tensor
_PIECE = 2**20  # bytes per write call and per read while hashing a file
_AHEAD = 16  # pieces a write may run ahead of its hash
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
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class StateError(RuntimeError):
    """A state folder is missing, corrupt, hostile, or belongs to another method or model."""


class StateLockedError(StateError):
    """Another update is writing the same output state folder."""


# ---------------------------------------------------------------------------------- mapped files
# Files whose names start with these prefixes are "mapped files" (the joint baseline's data chunks,
# the validation data of earlier updates, ``retain.val_history``):
# verified by a streaming hash and never held in memory; ``StateFolder.mapped_file`` hands out
# their path for memory-mapped reading, and ``write_state(linked_files=...)`` reuses them in a
# later state by hard link (copy across filesystems) without rewriting them.
MAPPED_PREFIX = "chunk_"
MAPPED_PREFIXES = (MAPPED_PREFIX, "val_chunk_")
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
    return name.startswith(MAPPED_PREFIXES) and name.endswith(".safetensors")


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


def printable(text: object) -> str:
    """``text`` with control characters escaped (manifest strings may hold terminal escape codes)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def os_error_message(err: OSError) -> str:
    """One line for an OS error on a state path: the path and the cause."""
    where = err.filename if err.filename is not None else "a state path"
    cause = err.strerror or type(err).__name__
    if err.filename2 is not None:
        return printable(f"{where} -> {err.filename2}: {cause}")
    return printable(f"{where}: {cause}")


# ------------------------------------------------------------------------------------------ JSON
def json_bytes(obj: Any) -> bytes:
    """The canonical bytes of a JSON state file: sorted keys, no NaN/Infinity, a final newline."""
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


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                return level
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _count_values(value: Any) -> int:
    count, stack = 0, [value]
    while stack and count <= MAX_HYPERPARAMETER_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict | list):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return count


def parse_json(data: bytes, where: str | Path) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, nesting at most ``MAX_JSON_DEPTH``;
    StateError naming ``where`` otherwise."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StateError(f"{where} is not valid JSON: {printable(err)}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise StateError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


# ------------------------------------------------------------------------------ safetensors files
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _safetensors_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The header of a safetensors file holding ``tensors`` and the order of their data: widest
    dtype first, then by name, so that every tensor starts at a multiple of its element size."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {t.dtype} in a state file")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def fsync_path(path: Path) -> None:
    """Flushes a file's or a folder's entry to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_and_sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> dict[str, Any]:
    """Writes a new file from ``chunks`` and fsyncs it; returns its sha256 and size. Every file of a
    state folder is written through this one function.

    One thread writes the pieces (``_PIECE`` bytes each) and then fsyncs the file; the calling
    thread hashes the same pieces up to ``_AHEAD`` pieces behind the writes (both release the
    GIL), so the hash overlaps the writes and, for the last pieces, the fsync: a small state costs
    about one write plus one fsync, a large one runs at disk speed. The hash is of the bytes
    handed to the writer, exactly as written."""
    if isinstance(chunks, list | tuple) and sum(memoryview(c).nbytes for c in chunks) <= _PIECE:
        digest = hashlib.sha256()  # a small file (JSON): no thread to start, the fsync dominates
        with open(path, "xb") as f:
            for data in chunks:
                f.write(data)
                digest.update(data)
            _flush_and_sync(f)
        return {"sha256": digest.hexdigest(), "bytes": sum(memoryview(c).nbytes for c in chunks)}
    digest, nbytes = hashlib.sha256(), 0
    unhashed: deque[memoryview] = deque()
    writes: deque[Future[Any]] = deque()
    with open(path, "xb") as f, ThreadPoolExecutor(1) as pool:
        try:
            for data in chunks:
                view = memoryview(data).cast("B")
                for start in range(0, len(view), _PIECE):
                    piece = view[start : start + _PIECE]
                    writes.append(pool.submit(f.write, piece))
                    unhashed.append(piece)
                    nbytes += len(piece)
                    if len(unhashed) > _AHEAD:  # bounds the bytes a stream of new pieces keeps alive
                        digest.update(unhashed.popleft())
                        writes.popleft().result()
            synced = pool.submit(_flush_and_sync, f)
            while unhashed:
                digest.update(unhashed.popleft())
            for done in writes:
                done.result()
            synced.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing more is written to a failed file
            raise
    return {"sha256": digest.hexdigest(), "bytes": nbytes}


def replace_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replaces the single file ``path`` atomically (reports, dataset caches): ``write`` fills a
    temporary file in the same folder, which is fsynced, made readable (0o644) and renamed over
    ``path``; a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_chunks(tensors: dict[str, torch.Tensor]) -> Iterable[bytes | memoryview]:
    """The pieces of a safetensors file holding ``tensors``, streamed from their memory (a contiguous
    CPU copy is made only of a tensor that is not one already)."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header, order = _safetensors_header(ready)
    return [header, *(_tensor_bytes(ready[name]) for name in order)]


def _read_exactly(f: BinaryIO, n: int, where: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise StateError(f"{where}: the file is truncated")
    return data


_HeaderEntries = dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]


def read_safetensors_header(f: BinaryIO, size: int, where: Path) -> tuple[bytes, _HeaderEntries]:
    """Parses and checks a safetensors header before anything is allocated: strict JSON, known
    dtypes, shapes whose byte size matches the offsets, offsets that tile the data exactly."""
    if size < 8:
        raise StateError(f"{where} is not a valid safetensors file: shorter than its 8-byte header length")
    prefix = _read_exactly(f, 8, where)
    length = int.from_bytes(prefix, "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise StateError(f"{where} is not a valid safetensors file: header of {length} bytes in a file of {size}")
    raw = _read_exactly(f, length, where)
    header = parse_json(raw.rstrip(b" "), f"{where} (header)")
    if not isinstance(header, dict):
        raise StateError(f"{where} is not a valid safetensors file: the header must be a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries: _HeaderEntries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise StateError(f"{where}: header entry {printable(name)!r} must have dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise StateError(f"{where}: tensor {printable(name)!r} has unknown dtype {printable(dtype)!r}")
        ok_shape = (
            isinstance(shape, list)
            and len(shape) <= 16
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)
        )
        ok_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= data_size for o in offsets)
        )
        if not ok_shape or not ok_offsets:
            raise StateError(f"{where}: tensor {printable(name)!r} has an invalid shape or data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise StateError(
                f"{where}: tensor {printable(name)!r} of shape {shape} needs {nbytes} bytes, "
                f"its offsets span {end - begin}"
            )
        entries[name] = (_DTYPES[dtype], tuple(shape), begin, end)
    position = 0
    for _, _, begin, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if begin != position:
            raise StateError(f"{where}: tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if position != data_size:
        raise StateError(f"{where}: tensor data ends at byte {position}, the file holds {data_size}")
    return prefix + raw, entries


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Opens a regular file for reading without following a symlink; (file, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StateError(f"{path}: must be a regular file, not a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StateError(f"{path}: must be a regular file")
    return os.fdopen(fd, "rb"), info.st_size


open_regular = _open_regular  # the same no-symlink open, for the chunk reader (retain.chunks)


def _check_digest(path: Path, entry: dict[str, Any], digest: str, nbytes: int) -> None:
    if nbytes != entry["bytes"] or digest != entry["sha256"]:
        raise StateError(
            f"{path}: checksum mismatch (expected sha256 {entry['sha256']} and {entry['bytes']} bytes, "
            f"found {digest} and {nbytes} bytes); the file is corrupt or was edited"
        )


def _stream_digest(f: BinaryIO, keep: bool = False) -> tuple[str, bytes | None]:
    """sha256 of the rest of an open file, read into one reused ``_PIECE`` buffer (nothing the
    size of the file is allocated; the bytes are kept, for a small JSON file, only when ``keep``).
    The buffer is an anonymous map, unmapped on return: no freed heap stays in the process."""
    h, kept = hashlib.sha256(), []
    with mmap.mmap(-1, _PIECE) as area:
        buffer = memoryview(area)
        try:
            while n := f.readinto(buffer):
                h.update(buffer[:n])
                if keep:
                    kept.append(bytes(buffer[:n]))
        finally:
            buffer.release()
    return h.hexdigest(), b"".join(kept) if keep else None


def _check_size(path: Path, entry: dict[str, Any], size: int) -> None:
    """Refuses a state file whose size is not the manifest's (before reading any of it)."""
    if size != entry["bytes"]:
        raise StateError(
            f"{path}: size mismatch (the manifest says {entry['bytes']} bytes, the file has {size}); "
            "the file is truncated, corrupt or was edited"
        )


def _mapped_identity(path: Path, entry: dict[str, Any]) -> tuple[int, int, int, int]:
    """Checks a mapped file's type and size against the manifest from its ``lstat`` (a symlink is
    refused, nothing is opened); its identity. Whoever opens it later compares this identity."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateError(f"{path}: must be a regular file, not a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"{path}: must be a regular file")
    _check_size(path, entry, info.st_size)
    return file_identity(info)


def _open_identified(path: Path, identity: tuple[int, int, int, int]) -> BinaryIO:
    """Opens ``path`` (no symlink followed) and checks that it is still the inode of ``identity``."""
    f, _ = _open_regular(path)
    if file_identity(os.fstat(f.fileno())) != identity:
        f.close()
        raise StateError(f"{path}: the file changed after its size was checked")
    return f


def _hash_mapped(f: BinaryIO, path: Path, entry: dict[str, Any], identity: tuple[int, int, int, int]) -> LinkedFile:
    """Streaming sha256 of an opened mapped file against the manifest (refused if it changes while
    it is hashed); records the inode in ``_VERIFIED`` once it has settled."""
    started = time.time_ns()
    digest, _ = _stream_digest(f)
    if file_identity(os.fstat(f.fileno())) != identity:
        raise StateError(f"{path}: the file changed while its checksum was being verified")
    _check_digest(path, entry, digest, entry["bytes"])
    if started - identity[3] >= _SETTLED_NS:
        _VERIFIED[identity] = digest
    return LinkedFile(path, digest, entry["bytes"], identity)


def _recorded(identity: tuple[int, int, int, int], entry: dict[str, Any]) -> bool:
    """Whether this inode was verified with this checksum earlier in the process (``_VERIFIED``)."""
    return not VERIFY_MAPPED_EVERY_TIME and _VERIFIED.get(identity) == entry["sha256"]


def _verify_mapped(path: Path, entry: dict[str, Any]) -> LinkedFile:
    """Streaming size + sha256 check of a mapped file (skipped for an inode already verified in
    this process, see ``_VERIFIED``); the file's bytes are not kept. Opened without following a
    symlink; refused if it changes while it is hashed."""
    identity = _mapped_identity(path, entry)
    if _recorded(identity, entry):
        return LinkedFile(path, entry["sha256"], entry["bytes"], identity)
    with _open_identified(path, identity) as f:
        return _hash_mapped(f, path, entry, identity)


class MappedVerification:
    """The checksums of a state's mapped files, verified by a background thread while the caller
    goes on (``StateFolder(defer_mapped=True)``, then ``verify_mapped_in_background()``).

    The thread hashes each file as ``StateFolder`` would at load (hashlib and reads release the
    GIL, so it overlaps training), after checking that the path still names the inode whose size
    was checked at load. ``join()`` waits for it and raises the StateError a load would have
    raised; call it before writing anything that relies on the files (``write_state`` links them
    as verified) and before handing out results computed from them."""

    def __init__(self, files: list[tuple[Path, dict[str, Any], tuple[int, int, int, int]]]) -> None:
        self.files = files
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if files:
            self._thread = threading.Thread(target=self._run, name="retain-verify-mapped", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for path, entry, identity in self.files:
                with _open_identified(path, identity) as f:
                    _hash_mapped(f, path, entry, identity)
        except BaseException as err:  # handed to join(): the thread itself never raises
            self.error = err

    @property
    def done(self) -> bool:
        """Whether the thread has finished (successfully or not)."""
        return self._thread is None or not self._thread.is_alive()

    def join(self) -> None:
        """Waits for every file's checksum; raises the first mismatch as a StateError naming the file."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


def _place_linked(source: LinkedFile, target: Path) -> None:
    """Puts ``source`` at ``target`` by hard link (a copy through ``write_file`` where linking
    fails, e.g. across filesystems) and checks that it holds the bytes the manifest will list: a
    link whose identity equals the one verified is the same inode, unwritten since, so it is
    trusted without reading it; anything else (a copy, or a source touched since) is hashed.

    A trusted link is not fsynced again: its bytes were fsynced when the state that first held
    them was written, and the link itself is a directory entry, made durable by the fsync of the
    new folder (``write_state``). That keeps a Joint save's cost independent of the number of chunks
    it links. A copy, and a link whose source was touched since it was verified, are fsynced."""
    try:
        os.link(source.path, target, follow_symlinks=False)
    except OSError:
        try:
            f, _ = _open_regular(source.path)
        except FileNotFoundError:
            raise StateError(f"{source.path}: a file the new state reuses is missing") from None
        with f:
            written = write_file(target, iter(lambda: f.read(_PIECE), b""))
        digest, size = written["sha256"], written["bytes"]
    else:
        info = os.lstat(target)
        if stat.S_ISREG(info.st_mode) and file_identity(info) == source.identity:
            return
        f, size = _open_regular(target)
        with f:
            digest, _ = _stream_digest(f)
        fsync_path(target)
    if size != source.bytes or digest != source.sha256:
        raise StateError(
            f"{source.path}: the file the new state reuses was altered since it was verified "
            f"(expected sha256 {source.sha256} and {source.bytes} bytes, found {digest} and {size} bytes)"
        )


def read_safetensors(
    path: Path, entry: dict[str, Any], into: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Reads a verified safetensors file straight into its tensors, hashing the bytes as they come;
    refuses it (StateError) if they no longer match ``entry`` (sha256 and size). ``into`` may name
    contiguous CPU tensors of the exact dtype and shape to read a tensor into (e.g. a view of the
    memory column it is loaded into), so that loading makes no second copy."""
    f, size = _open_regular(path)
    with f:
        if size != entry["bytes"]:
            raise StateError(f"{path}: size mismatch (the manifest says {entry['bytes']} bytes, the file has {size})")
        head, entries = read_safetensors_header(f, size, path)
        h = hashlib.sha256(head)
        given = into or {}
        tensors = {}
        for name, (dtype, shape, _, _) in entries.items():
            dest = given.get(name)
            fits = dest is not None and dest.dtype == dtype and tuple(dest.shape) == shape
            fits = fits and dest.device.type == "cpu" and dest.is_contiguous()
            tensors[name] = dest if fits else torch.empty(shape, dtype=dtype)
        for name in sorted(entries, key=lambda n: entries[n][2]):
            view = _tensor_bytes(tensors[name])
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                if f.readinto(chunk) != len(chunk):
                    raise StateError(f"{path}: the file is truncated")
                h.update(chunk)
        _check_digest(path, entry, h.hexdigest(), size)
    return tensors


# ------------------------------------------------------------------------------------------ paths
def same_or_inside(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def resolved(path: str | Path) -> Path:
    """The absolute path with symlinks of its parents resolved (the last name kept as given)."""
    p = Path(path).absolute()
    return p.parent.resolve() / p.name if p.name not in ("", ".", "..") else p.resolve()


def not_a_state_folder(path: Path) -> str | None:
    """Why ``path`` (an existing entry) may not be replaced by a state folder, or ``None`` when it is
    a retain state folder: a real folder with a valid manifest and only the files it lists."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is a file, not a state folder"
    try:
        manifest = _read_manifest(path)
        extra = sorted(set(os.listdir(path)) - set(manifest["files"]) - {MANIFEST})
    except (StateError, FileNotFoundError) as err:
        try:
            replaced = os.lstat(path).st_ino != info.st_ino
        except FileNotFoundError:
            replaced = True
        if replaced:  # a writer replaced it while we looked: it is checked again under the lock
            return None
        return f"it is not a retain state folder ({err})"
    if extra:
        return f"it holds files that are not part of its state: {printable(extra[:5])}"
    return None


def check_output_path(output: str | Path, input_folder: str | Path | None = None) -> Path:
    """The resolved output path if retain may write it; StateError (one line) otherwise.

    Writable: a path that does not exist (its parent folders are created), or an existing retain
    state folder, replaced atomically. Refused: anything else; an output equal to, inside, or
    containing ``input_folder``; a parent that is a file."""
    out = resolved(output)
    if out.name in ("", ".", ".."):
        raise StateError(f"output state folder {printable(output)} is not a folder name retain may write")
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise StateError(f"output state folder {printable(out)}: {printable(parent)} is a file, not a folder")
    if input_folder is not None:
        inp = resolved(input_folder)
        if inp.exists():
            inp = inp.resolve()
        if same_or_inside(out, inp) or same_or_inside(inp, out):
            relation = "is" if out == inp else ("is inside" if same_or_inside(out, inp) else "contains")
            raise StateError(
                f"output state folder {printable(out)} {relation} the input state folder {printable(inp)}: "
                "write each update to a new folder (the input is never modified)"
            )
    reason = not_a_state_folder(out)
    if reason is not None:
        raise StateError(f"refusing to write the output state folder {printable(out)}: {reason}")
    return out


def _exact_leftovers(folder: Path) -> Iterable[tuple[str, Path]]:
    """Hidden siblings that retain's writers of ``folder`` leave: ('tmp'|'old', path), matched by
    exact name (never a glob of the user's name)."""
    pattern = re.compile(re.escape(f".{folder.name}.") + r"(tmp|old)-[0-9]+-[0-9a-f]{8}")
    try:
        names = os.listdir(folder.parent)
    except FileNotFoundError:
        return []
    return [(m.group(1), folder.parent / n) for n in names if (m := pattern.fullmatch(n))]


def _remove_tree(path: Path) -> None:
    """Deletes one of retain's own temporary folders (never through a symlink)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
        os.unlink(path)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Cleans up after killed writers of ``folder`` (call under its lock): a verified previous state
    left between the two renames of a replacement is put back; other leftovers are deleted."""
    folder = resolved(folder)
    for kind, stale in _exact_leftovers(folder):
        if kind == "old" and not os.path.lexists(folder) and not_a_state_folder(stale) is None:
            try:
                StateFolder(stale)  # every checksum: only a complete state goes back into place
            except StateError:
                _remove_tree(stale)
                continue
            os.rename(stale, folder)
            continue
        _remove_tree(stale)


class OutputLock:
    """An exclusive lock on writing one output folder: the file ``.NAME.lock`` beside it, opened
    without following symlinks, held with ``flock`` and removed on release. A second writer fails
    at once with ``StateLockedError``. Re-entrant within one holder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = resolved(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.fd: int | None = None
        self.depth = 0

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> OutputLock:
        if self.fd is not None:
            self.depth += 1
            return self
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise StateError(f"{self.path}: the lock file is a symbolic link; refusing to follow it") from None
                raise
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StateError(f"{self.path}: the lock file is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StateLockedError(
                        f"another update is writing the state folder {printable(self.folder)} "
                        f"(lock {printable(self.path)} is held)"
                    ) from None
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd, self.depth = fd, 1
        remove_stale_temporaries(self.folder)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        fd, self.fd = self.fd, None
        try:
            os.unlink(self.path)  # still holding it: a waiting opener notices the inode change
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self.fd is not None:
            self.depth = 1
            self.release()


def remove_state_folder(folder: str | Path) -> None:
    """Deletes a retain state folder, and nothing that is not one (StateError naming why)."""
    folder = resolved(folder)
    reason = not_a_state_folder(folder)
    if reason is not None:
        raise StateError(f"refusing to delete {printable(folder)}: {reason}")
    doomed = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(folder, doomed)  # a kill mid-way leaves a leftover, never a half-deleted state
    shutil.rmtree(doomed)


def lock_output_folder(folder: str | Path) -> OutputLock:
    """``with lock_output_folder(path):`` holds the output lock of ``path``."""
    return OutputLock(folder)


# ------------------------------------------------------------------------------------------ write
def _write_files(
    tmp: Path, json_files: dict[str, Any], tensor_files: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict[str, Any]]:
    """Writes the JSON and tensor files of a state into ``tmp`` at the same time, each through
    ``write_file`` (written, hashed and fsynced), the largest in the calling thread and each other
    one in a thread of its own: the small files' fsyncs overlap the large one's instead of each
    costing a journal commit of its own. Returns their manifest entries once every file is on
    disk; an error is raised once all writes have stopped."""
    jobs: list[tuple[str, Any]] = [(name, lambda obj=obj: [json_bytes(obj)]) for name, obj in json_files.items()]
    jobs += [(name, lambda t=tensors: safetensors_chunks(t)) for name, tensors in tensor_files.items()]
    if len(jobs) <= 1:
        return {name: write_file(tmp / name, pieces()) for name, pieces in jobs}
    sizes = {name: sum(t.numel() * t.element_size() for t in ts.values()) for name, ts in tensor_files.items()}
    largest = max(sizes, key=lambda n: sizes[n]) if sizes else jobs[0][0]
    files: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(len(jobs) - 1) as pool:  # write_file is looked up at each call (tests wrap it)
        futures = {
            name: pool.submit(lambda n, p: write_file(tmp / n, p()), name, pieces)
            for name, pieces in jobs
            if name != largest
        }
        try:  # the largest file in this thread: no thread start on the longest path
            files[largest] = write_file(tmp / largest, dict(jobs)[largest]())
        finally:
            for future in futures.values():
                future.exception()  # all have stopped before an error leaves (the folder is then removed)
    files.update((name, future.result()) for name, future in futures.items())
    return files


def write_state(
    folder: str | Path,
    manifest: dict[str, Any],
    json_files: dict[str, Any],
    tensor_files: dict[str, dict[str, torch.Tensor]],
    linked_files: dict[str, LinkedFile] | None = None,
) -> Path:
    """Writes a complete state folder atomically: into a hidden temporary sibling, every file and
    the folder fsynced, then renamed into place. An existing ``folder`` is replaced only if it is a
    retain state folder (checked again here, under the caller's lock). ``manifest`` gets
    ``format``, ``format_version`` and ``files`` filled in here.

    ``linked_files`` maps names to verified files of other state folders that the new state reuses
    (``StateFolder.mapped_file``): they are hard-linked (copied across filesystems) into the
    temporary folder after the other files and listed with their verified sha256 and size, so
    reusing them costs no rewrite; one altered since it was verified is refused."""
    folder = resolved(folder)
    linked_files = dict(linked_files or {})
    for name in [*json_files, *tensor_files, *linked_files]:
        if not FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise ValueError(f"invalid state file name {name!r}")
    both = sorted((set(json_files) | set(tensor_files)) & set(linked_files))
    if both:
        raise ValueError(f"state files given both as contents and as linked files: {both}")
    reason = not_a_state_folder(folder)
    if reason is not None:
        raise StateError(f"refusing to replace {printable(folder)}: {reason}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    old: Path | None = None
    try:
        files = _write_files(tmp, json_files, tensor_files)
        for name, source in linked_files.items():
            _place_linked(source, tmp / name)
            files[name] = {"sha256": source.sha256, "bytes": source.bytes}
        manifest = dict(manifest, format=FORMAT_NAME, format_version=FORMAT_VERSION, files=dict(sorted(files.items())))
        validate_manifest(manifest, folder)
        write_file(tmp / MANIFEST, [json_bytes(manifest)])
        fsync_path(tmp)
        if os.path.lexists(folder):
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_path(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(folder):
            os.rename(old, folder)  # the new folder did not take its place: put the previous state back
        raise
    return folder


# ------------------------------------------------------------------------------------------ read
def validate_manifest(manifest: Any, folder: Path) -> None:
    """The manifest's schema: format and version, exact keys and types, plain file names, task ids."""
    where = folder / MANIFEST
    if not isinstance(manifest, dict):
        raise StateError(f"{where}: the manifest must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise StateError(f"{where}: not a retain state folder (format is {printable(manifest.get('format'))!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StateError(f"{where}: format_version must be an integer, got {printable(version)!r}")
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
        raise StateError(f"{where}: unexpected keys {printable(sorted(unknown))}, missing keys {sorted(missing)}")
    for key, kind in _MANIFEST_KEYS.items():
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{where}: {key!r} must be of type {kind.__name__}, got {type(value).__name__}")
    for name, entry in manifest["files"].items():
        if not FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise StateError(f"{where}: file name {printable(name)!r} is not a plain state file name inside the folder")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"sha256", "bytes"}
            or not isinstance(entry["sha256"], str)
            or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            or not isinstance(entry["bytes"], int)
            or isinstance(entry["bytes"], bool)
            or entry["bytes"] < 0
        ):
            raise StateError(f"{where}: entry for {name!r} must be {{'sha256': hex digest, 'bytes': int >= 0}}")
    model = manifest["model"]
    if set(model) != {"class", "hyperparameters", "task_ids"}:
        raise StateError(f"{where}: 'model' must have keys class, hyperparameters, task_ids")
    if not isinstance(model["class"], str) or not isinstance(model["hyperparameters"], dict):
        raise StateError(f"{where}: model class must be a string and hyperparameters an object")
    if _count_values(model["hyperparameters"]) > MAX_HYPERPARAMETER_VALUES:
        raise StateError(
            f"{where}: model hyperparameters hold more than {MAX_HYPERPARAMETER_VALUES} values; "
            "no model of retain's registry is described that way"
        )
    for key, ids in (("model.task_ids", model["task_ids"]), ("task_ids_seen", manifest["task_ids_seen"])):
        if not isinstance(ids, list) or len(ids) > MAX_TASK_IDS:
            raise StateError(f"{where}: {key} must be a list of at most {MAX_TASK_IDS} task ids")
        bad = next((t for t in ids if not (isinstance(t, str) and TASK_ID.fullmatch(t))), None)
        if bad is not None or len(set(ids)) != len(ids):
            what = f"{printable(bad)!r}" if bad is not None else "a repeated id"
            raise StateError(
                f"{where}: {key} must list distinct task ids (1-128 letters, digits, '_', '-'), got {what}"
            )
    if manifest["updates_done"] < 0 or manifest["updates_done"] >= 2**63:
        raise StateError(f"{where}: updates_done must be in [0, 2**63), got {manifest['updates_done']}")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        f, size = _open_regular(path)
    except FileNotFoundError:
        raise StateError(f"{path} is missing: not a complete retain state folder") from None
    with f:
        if size > MAX_MANIFEST_BYTES:
            raise StateError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, not a manifest")
        manifest = parse_json(f.read(MAX_MANIFEST_BYTES + 1), path)
    validate_manifest(manifest, folder)
    return manifest


class StateFolder:
    """A verified state folder. On opening, the manifest is checked and every listed file is
    checksummed by streaming (nothing is kept but the small JSON files); ``tensors(name)`` then reads
    a file straight into its tensors, verifying its checksum again as it reads. Mapped files
    (``is_mapped_file``) are checksummed the same way once and never read again here:
    ``mapped_file(name)`` hands out their verified path and identity for a memory map (with
    ``defer_mapped=True``: size-checked, their hash left to ``verify_mapped_in_background``)."""

    def __init__(self, folder: str | Path, defer_mapped: bool = False) -> None:
        """Opens and verifies ``folder``. With ``defer_mapped``, mapped files are checked for
        existence, type and size here but hashed only by ``verify_mapped_in_background()``."""
        self.path = Path(folder)
        try:
            info = os.stat(self.path)  # the folder may be a link (e.g. latest -> v5); its files may not
        except FileNotFoundError:
            raise StateError(f"state folder {printable(self.path)} does not exist") from None
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"state folder {printable(self.path)} is not a folder")
        self.manifest: dict[str, Any] = _read_manifest(self.path)
        present = set(os.listdir(self.path))
        listed = set(self.manifest["files"])
        missing, unexpected = listed - present, present - listed - {MANIFEST}
        if missing:
            raise StateError(f"{self.path}: files listed in the manifest are missing: {sorted(missing)}")
        if unexpected:
            raise StateError(
                f"{self.path}: unexpected files not listed in the manifest: {printable(sorted(unexpected)[:10])}"
            )
        self._json: dict[str, bytes] = {}
        self._mapped: dict[str, LinkedFile] = {}
        self._unverified: list[tuple[Path, dict[str, Any], tuple[int, int, int, int]]] = []
        for name, entry in self.manifest["files"].items():
            path = self.path / name
            if is_mapped_file(name) and defer_mapped:
                identity = _mapped_identity(path, entry)
                self._mapped[name] = LinkedFile(path, entry["sha256"], entry["bytes"], identity)
                if not _recorded(identity, entry):
                    self._unverified.append((path, entry, identity))
                continue
            if is_mapped_file(name):
                self._mapped[name] = _verify_mapped(path, entry)
                continue
            f, size = _open_regular(path)
            with f:
                _check_size(path, entry, size)
                if name.endswith(".json") and size > MAX_JSON_BYTES:
                    raise StateError(f"{path}: larger than {MAX_JSON_BYTES} bytes, not a state JSON file")
                digest, kept = _stream_digest(f, keep=name.endswith(".json"))
                _check_digest(path, entry, digest, size)
            if kept is not None:
                self._json[name] = kept

    def verify_mapped_in_background(self) -> MappedVerification:
        """Starts hashing the mapped files whose checksums ``defer_mapped=True`` left unverified (at
        most once: a second call has nothing left to verify); ``join()`` the result before relying
        on them. Until then, ``mapped_file`` hands out their paths with the manifest's checksums."""
        files, self._unverified = self._unverified, []
        return MappedVerification(files)

    def has(self, name: str) -> bool:
        """Whether the state lists the file ``name``: a JSON, tensor or mapped file (the manifest
        itself is not one of its files)."""
        return name in self.manifest["files"]

    def mapped_file(self, name: str) -> LinkedFile:
        """The verified path, sha256, size and identity of mapped file ``name``: open it by memory
        map (checking the identity of what was opened) or pass it to ``write_state(linked_files=)``."""
        if name not in self._mapped:
            raise StateError(f"{self.path}: {name} is missing (not a mapped file of this state)")
        return self._mapped[name]

    def json(self, name: str) -> Any:
        if name not in self._json:
            raise StateError(f"{self.path}: {name} is missing")
        return parse_json(self._json[name], self.path / name)

    def tensor_header(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Names, dtypes and shapes of a tensor file's tensors, from its header only (nothing allocated)."""
        entry = self._entry(name)
        f, size = _open_regular(self.path / name)
        with f:
            if size != entry["bytes"]:
                raise StateError(f"{self.path / name}: size mismatch")
            _, entries = read_safetensors_header(f, size, self.path / name)
        return {k: (dtype, shape) for k, (dtype, shape, _, _) in entries.items()}

    def tensors(self, name: str, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of file ``name``, read now (see ``read_safetensors`` for ``into``)."""
        if name in self._mapped:
            raise StateError(f"{self.path / name} is a mapped file: read it through mapped_file()")
        return read_safetensors(self.path / name, self._entry(name), into)

    def _entry(self, name: str) -> dict[str, Any]:
        entry = self.manifest["files"].get(name)
        if entry is None or not name.endswith(".safetensors"):
            raise StateError(f"{self.path}: {name} is missing")
        return entry


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


def check_tensor_specs(
    found: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    where: str | Path,
    needs: str = "expected",
) -> None:
    """``found`` has exactly the tensor names, dtypes and shapes of ``expected`` (from a header or
    from tensors): a file that does not fit is refused before anything is loaded into a model."""
    unknown, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    if unknown or missing:
        raise StateError(
            f"{where} does not fit: unexpected tensors {printable(unknown[:10])}, missing tensors {missing[:10]}"
        )
    for name, (dtype, shape) in found.items():
        ref_dtype, ref_shape = expected[name]
        if dtype != ref_dtype or tuple(shape) != tuple(ref_shape):
            raise StateError(
                f"{where}: tensor {name!r} is {dtype} {tuple(shape)}, {needs} {ref_dtype} {tuple(ref_shape)}"
            )


def tensor_specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def all_finite(value: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no Inf, in one pass that allocates nothing the size of the
    tensor (``isfinite(value).all()`` makes ~1.4x its size in temporaries): ``aminmax`` propagates
    NaN, so its min and max are both finite only when every value is. Dtypes without ``aminmax``
    (float8) are checked 256k values at a time, as float32. Non-floating-point tensors are finite."""
    if not value.dtype.is_floating_point or value.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(value)
    except (RuntimeError, NotImplementedError):
        flat, step = value.reshape(-1), _PIECE // 4
        return all(bool(torch.isfinite(flat[i : i + step].float()).all()) for i in range(0, flat.numel(), step))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    for name, value in tensors.items():
        if not all_finite(value):
            raise StateError(f"{where}: tensor {name!r} contains NaN or Inf")


def check_tensors_roundtrip(
    loaded: dict[str, torch.Tensor], resaved: dict[str, torch.Tensor], where: str | Path
) -> None:
    """After loading, saving again gives the same tensor names, dtypes and shapes (nothing in the
    file was ignored or silently converted), and no floating-point tensor holds NaN or Inf."""
    check_tensor_specs(tensor_specs(loaded), tensor_specs(resaved), where)
    check_finite(loaded, where)
