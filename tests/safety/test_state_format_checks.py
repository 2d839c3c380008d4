"""The state format's own checks, called directly: each refusal of the safetensors header parser,
the manifest schema, strict JSON, the JSON templates and tensor specs a load compares against, the
single-file replace and the one-line OS error, pinned by its message and its boundary."""

from __future__ import annotations

import copy
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from retain.state import (
    MANIFEST,
    StateError,
    StateFolder,
    check_json_like,
    check_output_path,
    check_tensor_specs,
    check_tensors_roundtrip,
    json_bytes,
    os_error_message,
    parse_json,
    printable,
    read_safetensors_header,
    remove_state_folder,
    replace_file,
    safetensors_chunks,
    validate_manifest,
    write_state,
)

WHERE = Path("/state/x.safetensors")


def _file(header: Any, data: bytes = b"") -> tuple[io.BytesIO, int]:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blob = len(raw).to_bytes(8, "little") + raw + data
    return io.BytesIO(blob), len(blob)


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ------------------------------------------------------------------------------ safetensors header
def test_a_well_formed_header_gives_every_tensor_in_any_header_order_and_its_own_bytes() -> None:
    header = {"b": _entry("U8", [3], 8, 11), "__metadata__": {"k": "v"}, "a": _entry("F32", [2], 0, 8)}
    f, size = _file(header, b"\1" * 11)
    head, entries = read_safetensors_header(f, size, WHERE)
    assert entries == {"b": (torch.uint8, (3,), 8, 11), "a": (torch.float32, (2,), 0, 8)}
    assert head == f.getvalue()[: size - 11] and f.tell() == size - 11  # the data is left unread


def test_a_file_of_only_an_empty_header_is_valid() -> None:
    f, size = _file({})  # header length == size - 8: the largest header the file allows
    assert read_safetensors_header(f, size, WHERE)[1] == {}
    f, size = _file({"z": _entry("F32", [0], 0, 0)})
    assert read_safetensors_header(f, size, WHERE)[1] == {"z": (torch.float32, (0,), 0, 0)}


@pytest.mark.parametrize(
    "blob, size, message",
    [
        (b"\0" * 7, 7, r"x.safetensors is not a valid safetensors file: shorter than its 8-byte header length"),
        (b"\0" * 8, 8, r"x.safetensors \(header\) is not valid JSON"),  # 8 bytes: a (bad) empty header
        ((100).to_bytes(8, "little") + b" " * 42, 50, r"header of 100 bytes in a file of 50"),
        ((64 * 2**20 + 1).to_bytes(8, "little"), 2**30, r"header of 67108865 bytes in a file of 1073741824"),
        ((64 * 2**20).to_bytes(8, "little") + b"{}", 2**30, r"x.safetensors: the file is truncated"),
    ],
)
def test_header_lengths_are_bounded_by_the_file_and_64_mib(blob: bytes, size: int, message: str) -> None:
    with pytest.raises(StateError, match=message):
        read_safetensors_header(io.BytesIO(blob), size, WHERE)


BIG = 2**62
HEADER_CASES = [
    ("list", [], b"", r"the header must be a JSON object"),
    ("entry-int", {"x": 3}, b"", r"header entry 'x' must have dtype, shape and data_offsets"),
    ("entry-keys", {"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, r"header entry 'x' must have dtype, shape"),
    ("dtype", {"x": _entry("PICKLE", [1], 0, 4)}, b"\0" * 4, r"tensor 'x' has unknown dtype 'PICKLE'"),
    ("shape-str", {"x": _entry("U8", "1", 0, 1)}, b"\0", r"tensor 'x' has an invalid shape or data_offsets"),  # type: ignore[arg-type]
    ("shape-17-dims", {"x": _entry("U8", [1] * 17, 0, 1)}, b"\0", r"invalid shape or data_offsets"),
    ("shape-bool", {"x": _entry("U8", [True], 0, 1)}, b"\0", r"invalid shape or data_offsets"),
    ("shape-negative", {"x": _entry("U8", [-1], 0, 1)}, b"\0", r"invalid shape or data_offsets"),
    ("shape-2**62", {"x": _entry("U8", [BIG], 0, 1)}, b"\0", r"invalid shape or data_offsets"),
    ("shape-2**62-1", {"x": _entry("U8", [BIG - 1], 0, 1)}, b"\0", rf"of shape \[{BIG - 1}\] needs {BIG - 1} bytes"),
    ("offsets-str", {"x": {"dtype": "U8", "shape": [1], "data_offsets": "0"}}, b"\0", r"invalid shape or data_off"),
    ("offsets-three", {"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, b"\0", r"invalid shape or"),
    ("offsets-bool", {"x": {"dtype": "U8", "shape": [1], "data_offsets": [False, 1]}}, b"\0", r"invalid shape or"),
    ("offsets-negative", {"x": _entry("U8", [1], -1, 0)}, b"\0", r"invalid shape or data_offsets"),
    ("offsets-past-data", {"x": _entry("U8", [2], 0, 2)}, b"\0", r"invalid shape or data_offsets"),
    ("span", {"x": _entry("F32", [2], 0, 4)}, b"\0" * 4, r"tensor 'x' of shape \[2\] needs 8 bytes, its offsets span"),
    ("gap", {"x": _entry("U8", [2], 2, 4)}, b"\0" * 4, r"tensor data overlaps or leaves a gap at byte 0"),
    (
        "overlap",
        {"x": _entry("U8", [2], 0, 2), "y": _entry("U8", [2], 1, 3)},
        b"\0" * 3,
        r"tensor data overlaps or leaves a gap at byte 2",
    ),
    ("short", {"x": _entry("U8", [2], 0, 2)}, b"\0" * 3, r"tensor data ends at byte 2, the file holds 3"),
]  # fmt: skip


@pytest.mark.parametrize("kind, header, data, message", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_a_malformed_header_is_refused_naming_the_tensor(kind: str, header: Any, data: bytes, message: str) -> None:
    f, size = _file(header, data)
    with pytest.raises(StateError, match=message) as info:
        read_safetensors_header(f, size, WHERE)
    assert str(info.value).startswith(str(WHERE))


def test_sixteen_dims_and_empty_dims_are_accepted() -> None:
    f, size = _file({"x": _entry("F64", [1] * 16, 0, 8), "e": _entry("F32", [0, 3], 8, 8)}, b"\0" * 8)
    entries = read_safetensors_header(f, size, WHERE)[1]
    assert entries == {"x": (torch.float64, (1,) * 16, 0, 8), "e": (torch.float32, (0, 3), 8, 8)}


def test_written_files_put_the_widest_dtype_first_then_names_and_pad_the_header_to_8_bytes() -> None:
    tensors = {"b": torch.arange(3, dtype=torch.int8), "c": torch.ones(2, dtype=torch.float64),
               "a": torch.zeros(1, dtype=torch.float64), "d": torch.ones(1, dtype=torch.int16)}  # fmt: skip
    pieces = safetensors_chunks(tensors)
    blob = b"".join(bytes(p) for p in pieces)
    length = int.from_bytes(blob[:8], "little")
    assert length % 8 == 0 and blob[8 + length - 1 : 8 + length] in (b" ", b"}")
    _, entries = read_safetensors_header(io.BytesIO(blob), len(blob), WHERE)
    assert {k: (e[2], e[3]) for k, e in entries.items()} == {"a": (0, 8), "c": (8, 24), "d": (24, 26), "b": (26, 29)}
    assert blob[8 + length + 26 :] == bytes([0, 1, 2])


def test_a_tensor_of_a_dtype_safetensors_lacks_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot store tensor 'z' of dtype torch.complex64 in a state file"):
        write_state(tmp_path / "s", _manifest(), {}, {"t.safetensors": {"z": torch.zeros(2, dtype=torch.complex64)}})
    assert not (tmp_path / "s").exists() and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ manifest
def _manifest(**changes: Any) -> dict[str, Any]:
    manifest = {
        "format": "retain-state", "format_version": 1, "retain_version": "t", "method": "m",
        "model": {"class": "c", "hyperparameters": {}, "task_ids": ["t1"]}, "method_options": {}, "options": {},
        "updates_done": 1, "task_ids_seen": ["t1"], "files": {"a.json": {"sha256": "0" * 64, "bytes": 3}},
    }  # fmt: skip
    manifest.update(changes)
    return manifest


def _with(path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(_manifest())
    *parents, last = path.split(".")
    target = manifest
    for key in parents:
        target = target[key]
    target[last] = value
    return manifest


def _without(key: str) -> dict[str, Any]:
    manifest = _manifest()
    del manifest[key]
    return manifest


SHA = "0" * 64
MANIFEST_CASES = [
    ("list", [], r"the manifest must be a JSON object"),
    ("format", _manifest(format="torch"), r"not a retain state folder \(format is 'torch'\)"),
    ("version-bool", _manifest(format_version=True), r"format_version must be an integer, got 'True'"),
    ("version-str", _manifest(format_version="1"), r"format_version must be an integer, got '1'"),
    ("version-0", _manifest(format_version=0), r"format_version must be >= 1, got 0"),
    ("version-2", _manifest(format_version=2), r"format_version 2 is newer than this retain understands \(1\)"),
    ("unknown-key", _manifest(extra=1), r"unexpected keys \['extra'\], missing keys \[\]"),
    ("missing-key", _without("method"), r"unexpected keys \[\], missing keys \['method'\]"),
    ("type-str", _manifest(method=3), r"'method' must be of type str, got int"),
    ("type-bool-int", _manifest(updates_done=True), r"'updates_done' must be of type int, got bool"),
    ("type-dict", _manifest(options=[]), r"'options' must be of type dict, got list"),
    ("file-name", _with("files", {"../a.json": {"sha256": SHA, "bytes": 1}}), r"file name '../a.json' is not a plain"),
    ("file-manifest", _with("files", {MANIFEST: {"sha256": SHA, "bytes": 1}}), r"file name 'manifest.json' is not"),
    ("entry-int", _with("files", {"a.json": 3}), r"entry for 'a.json' must be \{'sha256': hex digest, 'bytes'"),
    ("entry-keys", _with("files", {"a.json": {"sha256": SHA, "bytes": 1, "x": 0}}), r"entry for 'a.json' must be"),
    ("sha-int", _with("files", {"a.json": {"sha256": 0, "bytes": 1}}), r"entry for 'a.json' must be"),
    ("sha-upper", _with("files", {"a.json": {"sha256": "A" * 64, "bytes": 1}}), r"entry for 'a.json' must be"),
    ("sha-short", _with("files", {"a.json": {"sha256": "0" * 63, "bytes": 1}}), r"entry for 'a.json' must be"),
    ("bytes-str", _with("files", {"a.json": {"sha256": SHA, "bytes": "1"}}), r"entry for 'a.json' must be"),
    ("bytes-bool", _with("files", {"a.json": {"sha256": SHA, "bytes": True}}), r"entry for 'a.json' must be"),
    ("bytes-negative", _with("files", {"a.json": {"sha256": SHA, "bytes": -1}}), r"entry for 'a.json' must be"),
    ("model-keys", _with("model", {"class": "c", "hyperparameters": {}}), r"'model' must have keys class, hyperp"),
    ("model-class", _with("model.class", 3), r"model class must be a string and hyperparameters an object"),
    ("model-hyper", _with("model.hyperparameters", []), r"model class must be a string and hyperparameters an obj"),
    ("hyper-values", _with("model.hyperparameters", {"v": list(range(4095))}), r"hold more than 4096 values"),
    ("heads-type", _with("model.task_ids", "t1"), r"model.task_ids must be a list of at most 100000 task ids"),
    ("seen-too-many", _manifest(task_ids_seen=[f"t{i}" for i in range(100_001)]), r"task_ids_seen must be a list"),
    ("seen-bad-id", _manifest(task_ids_seen=["t1", "a b"]), r"task_ids_seen must list distinct task ids .*got 'a b'"),
    ("seen-int-id", _manifest(task_ids_seen=[3]), r"task_ids_seen must list distinct task ids .*got '3'"),
    ("heads-repeated", _with("model.task_ids", ["t", "t"]), r"model.task_ids must list distinct .*got a repeated id"),
    ("updates-negative", _manifest(updates_done=-1), r"updates_done must be in \[0, 2\*\*63\), got -1"),
    ("updates-2**63", _manifest(updates_done=2**63), r"updates_done must be .*got 9223372036854775808"),
]  # fmt: skip


@pytest.mark.parametrize("kind, manifest, message", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_a_manifest_off_its_schema_is_refused_naming_the_field(kind: str, manifest: Any, message: str) -> None:
    with pytest.raises(StateError, match=message) as info:
        validate_manifest(manifest, Path("/s"))
    assert str(info.value).startswith("/s/manifest.json: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "manifest",
    [
        _manifest(),
        _manifest(updates_done=0, task_ids_seen=[], files={}),
        _manifest(updates_done=2**63 - 1),
        _with("model.hyperparameters", {"v": list(range(4094))}),  # 4096 values: the dict, the list, 4094 numbers
        _manifest(task_ids_seen=[f"t{i}" for i in range(100_000)]),
        _with("files", {"b.safetensors": {"sha256": "a" * 64, "bytes": 0}}),
    ],
    ids=["plain", "empty", "updates-max", "hyper-4096", "ids-100000", "empty-file"],
)
def test_manifests_at_the_limits_are_accepted(manifest: dict[str, Any]) -> None:
    validate_manifest(manifest, Path("/s"))  # raises nothing: the limits are inclusive


# ------------------------------------------------------------------------------------- JSON
def test_json_state_files_are_canonical() -> None:
    assert json_bytes({"b": 1, "a": [1, "x"]}) == b'{\n  "a": [\n    1,\n    "x"\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json_bytes({"a": float("nan")})


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"a": NaN}', r"f.json is not valid JSON: NaN is not valid JSON"),
        (b'{"a": -Infinity}', r"f.json is not valid JSON: -Infinity is not valid JSON"),
        (b'{"a": 1, "a": 2}', r"f.json is not valid JSON: duplicate key 'a'"),
        (b"\xff{}", r"f.json is not valid JSON: .*codec can't decode"),
        (b"[" * 33 + b"]" * 33, r"f.json: JSON nested deeper than 32 levels"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, r"f.json: JSON nested deeper than 32 levels"),
    ],
)
def test_parse_json_is_strict(data: bytes, message: str) -> None:
    with pytest.raises(StateError, match=message):
        parse_json(data, "f.json")


def test_parse_json_accepts_32_levels_and_returns_the_value() -> None:
    assert parse_json(b"[" * 32 + b"]" * 32, "f") == json.loads("[" * 32 + "]" * 32)
    assert parse_json(b'{"a": [1, {"b": null}], "c": 1.5}', "f") == {"a": [1, {"b": None}], "c": 1.5}


TEMPLATE = {"n": 1, "x": 0.5, "s": "", "b": False, "any": None, "ids": [], "rows": [{"k": 1}], "sub": {"d": 2}}
GOOD = {"n": 3, "x": 2, "s": "v", "b": True, "any": 4.5, "ids": ["t1"], "rows": [{"k": 5}, {"k": 6}], "sub": {"d": 7}}


def _good(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(GOOD), **changes}


@pytest.mark.parametrize(
    "value, message",
    [
        ([1], r"f: expected an object, got list '\[1\]'$"),
        ({**GOOD, "z": 1}, r"f: unknown keys \['z'\], missing keys \[\]$"),
        ({k: v for k, v in GOOD.items() if k != "n"}, r"f: unknown keys \[\], missing keys \['n'\]$"),
        (_good(n=True), r"f: expected an integer at 'n', got bool 'True'"),
        (_good(n=1.0), r"f: expected an integer at 'n', got float '1.0'"),
        (_good(x=True), r"f: expected a number at 'x', got bool"),
        (_good(x="1"), r"f: expected a number at 'x', got str '1'"),
        (_good(s=1), r"f: expected a string at 's', got int"),
        (_good(b=1), r"f: expected a boolean at 'b', got int"),
        (_good(any={}), r"f: expected a JSON scalar at 'any', got dict"),
        (_good(ids="t1"), r"f: expected a list at 'ids', got str"),
        (_good(ids=["t1", 2]), r"f: expected a string at 'ids\[1\]', got int"),
        (_good(rows=[{"k": 1}, {"k": "2"}]), r"f: expected an integer at 'rows\[1\].k', got str"),
        (_good(rows=[{"k": 1}, {}]), r"f: unknown keys \[\], missing keys \['k'\] at 'rows\[1\]'"),
        (_good(sub={"d": None}), r"f: expected an integer at 'sub.d', got NoneType"),
    ],
)
def test_json_that_does_not_fit_its_template_is_refused_with_its_key(value: Any, message: str) -> None:
    with pytest.raises(StateError, match=message):
        check_json_like(value, TEMPLATE, "f")


def test_json_that_fits_its_template_passes() -> None:
    check_json_like(GOOD, TEMPLATE, "f")
    check_json_like(_good(ids=[], rows=[], any="s", x=-1.5), TEMPLATE, "f")


def test_tensor_specs_must_match_names_dtypes_and_shapes() -> None:
    expected = {"w": (torch.float32, (2, 3)), "b": (torch.float32, (3,))}
    check_tensor_specs({"w": (torch.float32, [2, 3]), "b": (torch.float32, (3,))}, expected, "m")  # lists are shapes
    with pytest.raises(StateError, match=r"^m does not fit: unexpected tensors \['x'\], missing tensors \['b'\]$"):
        check_tensor_specs({"w": (torch.float32, (2, 3)), "x": (torch.float32, (3,))}, expected, "m")
    with pytest.raises(StateError, match=r"^m: tensor 'b' is torch.float64 \(3,\), expected torch.float32 \(3,\)$"):
        check_tensor_specs({"w": (torch.float32, (2, 3)), "b": (torch.float64, (3,))}, expected, "m")
    with pytest.raises(StateError, match=r"^m: tensor 'w' is torch.float32 \(3, 2\), the model needs torch.float32"):
        check_tensor_specs({"w": (torch.float32, (3, 2)), "b": (torch.float32, (3,))}, expected, "m", "the model needs")


def test_a_round_trip_check_refuses_dropped_tensors_and_non_finite_values() -> None:
    loaded = {"a": torch.ones(2), "n": torch.arange(3)}
    check_tensors_roundtrip(loaded, {"a": torch.zeros(2), "n": torch.zeros(3, dtype=torch.long)}, "f")
    with pytest.raises(StateError, match=r"f does not fit: unexpected tensors \['n'\], missing tensors \[\]"):
        check_tensors_roundtrip(loaded, {"a": torch.zeros(2)}, "f")
    with pytest.raises(StateError, match=r"f: tensor 'a' contains NaN or Inf"):
        bad = {"a": torch.tensor([1.0, float("inf")]), "n": torch.arange(3)}
        check_tensors_roundtrip(bad, {"a": torch.zeros(2), "n": torch.zeros(3, dtype=torch.long)}, "f")


def test_all_finite_checks_float8_in_pieces_up_to_the_last_value() -> None:
    from retain.state import all_finite

    values = torch.zeros(2**18 + 5).to(torch.float8_e5m2)  # more than one 256k piece
    assert all_finite(values)
    values[-1] = float("inf")
    assert not all_finite(values)
    assert not all_finite(torch.tensor([0.0, float("nan")]).to(torch.float8_e4m3fn))
    assert not all_finite(torch.tensor([1.0, float("inf")])) and not all_finite(torch.tensor([-float("inf"), 1.0]))


# ------------------------------------------------------------------------------- messages, files
def test_printable_escapes_control_characters_and_keeps_spaces() -> None:
    assert printable("a b\x1b[31m\nc\t") == "a b\\x1b[31m\\nc\\t"
    assert printable(3) == "3"


def test_os_errors_become_one_line_naming_the_paths_and_the_cause() -> None:
    assert os_error_message(OSError(2, "No such file", "/a\nb")) == "/a\\nb: No such file"
    assert os_error_message(OSError(18, "Cross-device link", "/a", None, "/b")) == "/a -> /b: Cross-device link"
    assert os_error_message(PermissionError(13, "Permission denied")) == "a state path: Permission denied"
    assert os_error_message(OSError("boom")) == "a state path: OSError"


def test_replace_file_swaps_in_a_fsynced_readable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")
    os.chmod(target, 0o600)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old_umask = os.umask(0o077)
    try:
        replace_file(target, lambda f: f.write(b"new"))
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" and stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert len(synced) == 1 and Path(synced[0]).parent == tmp_path and synced[0].endswith(".tmp")
    assert Path(synced[0]).name.startswith(".report.md.")
    assert sorted(os.listdir(tmp_path)) == ["report.md"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old")

    def fail(f: Any) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_file(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]


# ---------------------------------------------------------------------------------- state folders
def _state(tmp_path: Path, name: str = "s") -> Path:
    return write_state(
        tmp_path / name, _manifest(files={}), {"learner.json": {"a": [1, 2]}},
        {"memory.safetensors": {"x": torch.arange(6.0)}},
    )  # fmt: skip


def test_a_state_folder_hands_out_its_files_by_kind(tmp_path: Path) -> None:
    folder = _state(tmp_path)
    state = StateFolder(folder)
    assert state.json("learner.json") == {"a": [1, 2]} and state.has("learner.json") and not state.has(MANIFEST)
    assert state.tensor_header("memory.safetensors") == {"x": (torch.float32, (6,))}
    assert torch.equal(state.tensors("memory.safetensors")["x"], torch.arange(6.0))
    with pytest.raises(StateError, match=r"s: other.json is missing$"):
        state.json("other.json")
    with pytest.raises(StateError, match=r"s: learner.json is missing$"):  # a JSON file has no tensors
        state.tensors("learner.json")
    with pytest.raises(StateError, match=r"s: chunk_000000.safetensors is missing \(not a mapped file of this state\)"):
        state.mapped_file("chunk_000000.safetensors")
    with open(folder / "memory.safetensors", "ab") as f:
        f.write(b"\0")  # changed after the folder was verified
    with pytest.raises(StateError, match=r"memory.safetensors: size mismatch$"):
        state.tensor_header("memory.safetensors")
    with pytest.raises(StateError, match=r"memory.safetensors: size mismatch \(the manifest says \d+ bytes, the file"):
        state.tensors("memory.safetensors")


def test_a_tensor_file_truncated_and_padded_back_after_verification_is_refused(tmp_path: Path) -> None:
    folder = _state(tmp_path)
    state = StateFolder(folder)
    path = folder / "memory.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"\0\0\0\x7f")  # same size, other bytes
    with pytest.raises(StateError, match=r"memory.safetensors: checksum mismatch"):
        state.tensors("memory.safetensors")


def test_a_state_path_that_is_missing_or_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=r"state folder .*nothing does not exist"):
        StateFolder(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match=r"state folder .*file is not a folder"):
        StateFolder(tmp_path / "file")


def test_a_manifest_over_4_mib_is_refused_and_one_of_4_mib_is_read(tmp_path: Path) -> None:
    folder = _state(tmp_path)
    text = (folder / MANIFEST).read_bytes()
    (folder / MANIFEST).write_bytes(text + b" " * (4 * 2**20 - len(text)))  # JSON allows trailing spaces
    assert StateFolder(folder).json("learner.json") == {"a": [1, 2]}
    (folder / MANIFEST).write_bytes(text + b" " * (4 * 2**20 + 1 - len(text)))
    with pytest.raises(StateError, match=r"manifest.json: larger than 4194304 bytes, not a manifest"):
        StateFolder(folder)


def test_a_json_state_file_over_64_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    folder = _state(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["learner.json"]["bytes"] = 64 * 2**20 + 1
    (folder / MANIFEST).write_text(json.dumps(manifest))
    os.truncate(folder / "learner.json", 64 * 2**20 + 1)  # sparse: never read
    with pytest.raises(StateError, match=r"learner.json: larger than 67108864 bytes, not a state JSON file"):
        StateFolder(folder)
    manifest["files"]["learner.json"]["bytes"] = 64 * 2**20
    (folder / MANIFEST).write_text(json.dumps(manifest))
    os.truncate(folder / "learner.json", 64 * 2**20)
    with pytest.raises(StateError, match=r"learner.json: checksum mismatch"):  # 64 MiB is allowed: hashed
        StateFolder(folder)


def test_remove_state_folder_deletes_a_state_and_nothing_else(tmp_path: Path) -> None:
    folder = _state(tmp_path)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    with pytest.raises(StateError, match=r"refusing to delete .*user: it is not a retain state folder"):
        remove_state_folder(tmp_path / "user")
    remove_state_folder(folder)
    assert sorted(os.listdir(tmp_path)) == ["user"] and (tmp_path / "user" / "notes.txt").read_text() == "keep"


def test_the_root_is_not_an_output_folder_name() -> None:
    with pytest.raises(StateError, match=r"output state folder / is not a folder name retain may write"):
        check_output_path("/")


def test_write_state_lists_every_file_with_its_digest_and_keeps_the_callers_manifest(tmp_path: Path) -> None:
    import hashlib

    given = _manifest(files={})
    folder = write_state(tmp_path / "s", given, {"learner.json": {"a": 1}}, {})
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / "learner.json").read_bytes()
    assert manifest["files"] == {"learner.json": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    assert given["files"] == {} and manifest["format"] == "retain-state" and manifest["format_version"] == 1
    assert data == json_bytes({"a": 1})


def test_a_linked_file_changed_since_it_was_verified_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    source = write_state(tmp_path / "a", _manifest(files={}), {}, {"chunk_000000.safetensors": {"x": torch.ones(4)}})
    linked = StateFolder(source).mapped_file("chunk_000000.safetensors")
    data = bytearray((source / "chunk_000000.safetensors").read_bytes())
    data[-1] ^= 1
    os.unlink(source / "chunk_000000.safetensors")  # a new inode, same size: the identity differs
    (source / "chunk_000000.safetensors").write_bytes(bytes(data))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: the file the new state reuses was altered"):
        write_state(tmp_path / "b", _manifest(files={}), {}, {}, {"chunk_000000.safetensors": linked})
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_a_linked_file_is_copied_where_it_cannot_be_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_state(tmp_path / "a", _manifest(files={}), {}, {"chunk_000000.safetensors": {"x": torch.ones(4)}})
    linked = StateFolder(source).mapped_file("chunk_000000.safetensors")

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    folder = write_state(tmp_path / "b", _manifest(files={}), {}, {}, {"chunk_000000.safetensors": linked})
    copied = folder / "chunk_000000.safetensors"
    assert copied.read_bytes() == (source / "chunk_000000.safetensors").read_bytes()
    assert os.stat(copied).st_ino != os.stat(source / "chunk_000000.safetensors").st_ino
    assert StateFolder(folder).mapped_file("chunk_000000.safetensors").sha256 == linked.sha256
    os.unlink(source / "chunk_000000.safetensors")
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: a file the new state reuses is missing"):
        write_state(tmp_path / "c", _manifest(files={}), {}, {}, {"chunk_000000.safetensors": linked})
    assert not (tmp_path / "c").exists()


def test_a_file_given_both_as_contents_and_as_a_link_is_refused(tmp_path: Path) -> None:
    source = write_state(tmp_path / "a", _manifest(files={}), {}, {"chunk_000000.safetensors": {"x": torch.ones(4)}})
    linked = StateFolder(source).mapped_file("chunk_000000.safetensors")
    with pytest.raises(ValueError, match=r"given both as contents and as linked files: \['chunk_000000.safetensors'\]"):
        write_state(tmp_path / "b", _manifest(files={}), {}, {"chunk_000000.safetensors": {"x": torch.ones(1)}},
                    {"chunk_000000.safetensors": linked})  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_tensors_are_read_from_their_offsets_into_the_buffers_that_fit_and_only_those(tmp_path: Path) -> None:
    """Data is laid out widest dtype first, not by name; a buffer of another dtype, shape or layout
    is not read into (a new tensor is), one that fits is filled in place."""
    a, b, c = torch.arange(3, dtype=torch.int8), torch.tensor([0.5, -2.0], dtype=torch.float64), torch.arange(6.0)
    folder = write_state(tmp_path / "s", _manifest(files={}), {}, {"t.safetensors": {"a": a, "b": b, "c": c}})
    state = StateFolder(folder)
    plain = state.tensors("t.safetensors")
    assert torch.equal(plain["a"], a) and torch.equal(plain["b"], b) and torch.equal(plain["c"], c)
    fits = torch.zeros(2, dtype=torch.float64)
    wrong = {"a": torch.zeros(3, dtype=torch.int16), "c": torch.zeros(6, 2)[:, 0], "b": fits}
    wrong_shape = torch.zeros(2, 3)
    read = state.tensors("t.safetensors", into=wrong)
    assert read["b"] is fits and fits.tolist() == [0.5, -2.0]
    assert read["a"].dtype == torch.int8 and torch.equal(read["a"], a) and wrong["a"].eq(0).all()
    assert torch.equal(read["c"], c) and wrong["c"].eq(0).all()  # not contiguous: not read into
    read = state.tensors("t.safetensors", into={"c": wrong_shape})
    assert read["c"].shape == (6,) and torch.equal(read["c"], c) and wrong_shape.eq(0).all()


def test_a_lock_path_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    from retain.state import OutputLock

    os.mkfifo(tmp_path / ".out.lock")
    with pytest.raises(StateError, match=r"\.out\.lock: the lock file is not a regular file$"):
        OutputLock(tmp_path / "out").acquire()


def test_releasing_a_lock_not_held_or_whose_file_is_gone_is_harmless(tmp_path: Path) -> None:
    from retain.state import OutputLock

    lock = OutputLock(tmp_path / "out")
    lock.release()  # never acquired
    assert not lock.held and lock.depth == 0
    lock.acquire()
    assert lock.held and (tmp_path / ".out.lock").is_file()
    os.unlink(tmp_path / ".out.lock")
    fd = lock.fd
    lock.release()
    assert not lock.held and fd is not None
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # closed
    with OutputLock(tmp_path / "out"):
        pass


def test_a_lock_dropped_without_release_is_released(tmp_path: Path) -> None:
    import gc

    from retain.state import OutputLock

    lock = OutputLock(tmp_path / "out").acquire()
    lock.acquire()  # held twice
    del lock
    gc.collect()
    assert not (tmp_path / ".out.lock").exists()
    with OutputLock(tmp_path / "out") as again:
        assert again.held


def test_an_output_under_a_file_is_refused_and_leftovers_of_a_missing_parent_are_none(tmp_path: Path) -> None:
    from retain.state import remove_stale_temporaries

    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match=r"output state folder .*f/out: .*f is a file, not a folder$"):
        check_output_path(tmp_path / "f" / "out")
    remove_stale_temporaries(tmp_path / "missing" / "out")  # nothing to clean, nothing raised
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_write_state_creates_parents_replaces_a_state_without_leftovers_and_validates_first(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "s"
    write_state(target, _manifest(files={}), {"learner.json": {"v": 1}}, {})
    write_state(target, _manifest(files={}), {"learner.json": {"v": 2}}, {})  # replaces the state
    assert os.listdir(target.parent) == ["s"] and StateFolder(target).json("learner.json") == {"v": 2}
    with pytest.raises(StateError, match=r"manifest.json: updates_done must be in \[0, 2\*\*63\), got -1"):
        write_state(target, _manifest(files={}, updates_done=-1), {"learner.json": {"v": 3}}, {})
    assert os.listdir(target.parent) == ["s"] and StateFolder(target).json("learner.json") == {"v": 2}


def test_a_deferred_verification_runs_once_and_reports_when_done(tmp_path: Path) -> None:
    from retain.state import MappedVerification

    nothing = MappedVerification([])
    assert nothing.done
    nothing.join()  # nothing to wait for, nothing raised
    folder = write_state(tmp_path / "s", _manifest(files={}), {}, {"chunk_000000.safetensors": {"x": torch.ones(3)}})
    state = StateFolder(folder, defer_mapped=True)
    first = state.verify_mapped_in_background()
    first.join()
    assert first.done and first.error is None
    assert state.verify_mapped_in_background().files == []  # a second call has nothing left to verify
