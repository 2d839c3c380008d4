"""Hostile and corrupt state folders: every file of a real state folder x every corruption kind.

The state is a real Super-ER folder (model, learner with CLS copies and generator states,
memory with logits and features). Each case corrupts one file, either leaving the manifest as
it was ("unsigned": the checksum must catch it) or updating the file's checksum and size in the
manifest ("signed": what a deliberate attacker would do, so the content checks must catch it).
Loading it into an updater must raise ``StateError`` naming the file, without unpickling or
running anything (a pickle payload would create a marker folder; ``pickle`` and ``torch.load``
are booby-trapped during the load). ``load_model``, which reads only the manifest and the
model, must raise ``StateError`` or (for a signed corruption of a file it does not read)
succeed; never another exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_rel_support import build_updater

from retain import load_model
from retain.state import StateError

JSON_FILES = ["manifest.json", "learner.json", "memory.json"]
TENSOR_FILES = ["model.safetensors", "learner.safetensors", "memory.safetensors"]
ALL_FILES = JSON_FILES + TENSOR_FILES
JOB = {"method": "super", "items": 48, "epochs": 1}
_tried: list[str] = []


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that something was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.marker,))


# ------------------------------------------------------------------------------ corruption kinds
def _first_key(obj: dict[str, Any], kind: type) -> str:
    return next(k for k in sorted(obj) if isinstance(obj[k], kind) and not isinstance(obj[k], bool))


def _json_edit(edit: Callable[[Any], Any]) -> Callable[[bytes, Path], bytes]:
    return lambda data, _: json.dumps(edit(json.loads(data))).encode()


def _set(key: str | None, value: Any, kind: type = int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, (key or _first_key(obj, kind)): value}

    return edit


def _tensor_edit(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[bytes, Path], bytes]:
    def apply(data: bytes, _: Path) -> bytes:
        tensors = dict(st_load(data))
        edit(tensors)
        return st_save(tensors)

    return apply


def _first_float(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if tensors[k].dtype.is_floating_point)


def _nan(t: dict[str, torch.Tensor]) -> None:
    key = _first_float(t)
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")


def _flip_bit(data: bytes, _: Path) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x10
    return bytes(out)


def _duplicate_first_key(data: bytes, _: Path) -> bytes:
    obj = json.loads(data)
    key = sorted(obj)[0]
    return f"{{{json.dumps(key)}: {json.dumps(obj[key])}, ".encode() + data.lstrip()[1:]


def _torch_save(data: bytes, _: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "payload": _Payload("never")}, buffer)
    return buffer.getvalue()


# (kind, applies to, signed, transform of the bytes or None for special handling)
KINDS: list[tuple[str, list[str], bool, Any]] = [
    ("pickle", ALL_FILES, False, "pickle"),
    ("pickle-signed", ALL_FILES[1:], True, "pickle"),
    ("torch-save-signed", TENSOR_FILES, True, _torch_save),
    ("truncated", ALL_FILES, False, lambda d, _: d[: len(d) // 2]),
    ("truncated-signed", ALL_FILES[1:], True, lambda d, _: d[: len(d) // 2]),
    ("bit-flip", ALL_FILES, False, _flip_bit),
    ("empty-signed", ALL_FILES[1:], True, lambda d, _: b""),
    ("garbage-signed", ALL_FILES[1:], True, lambda d, _: random.Random(len(d)).randbytes(len(d))),
    ("missing", ALL_FILES, False, "missing"),
    ("symlink-outside", ALL_FILES, False, "symlink"),
    ("directory", ALL_FILES, False, "directory"),
    # edited JSON (signed where it is not the manifest)
    ("json-array", JSON_FILES, True, lambda d, _: b"[]"),
    ("json-not-utf8", JSON_FILES, True, lambda d, _: b"\xff\xfe{}"),
    ("json-nan", JSON_FILES, True, _json_edit(_set(None, float("nan")))),
    ("json-wrong-type", JSON_FILES, True, _json_edit(lambda o: _set(None, str(o[_first_key(o, int)]))(o))),
    ("json-float-for-int", JSON_FILES, True, _json_edit(lambda o: _set(None, 1.5)(o))),
    ("json-unknown-key", JSON_FILES, True, _json_edit(_set("injected", 1))),
    ("json-missing-key", JSON_FILES, True, _json_edit(lambda o: {k: o[k] for k in sorted(o)[1:]})),
    ("json-duplicate-key", JSON_FILES, True, _duplicate_first_key),
    ("json-deep-nesting", JSON_FILES, True, lambda d, _: b"[" * 100_000 + b"]" * 100_000),
    # edited tensors (signed)
    ("tensor-extra", TENSOR_FILES, True, _tensor_edit(lambda t: t.update(injected=torch.zeros(3)))),
    ("tensor-missing", TENSOR_FILES, True, _tensor_edit(lambda t: t.pop(sorted(t)[0]))),
    ("tensor-dtype", TENSOR_FILES, True, _tensor_edit(lambda t: t.update({sorted(t)[0]: t[sorted(t)[0]].double()}))),
    ("tensor-shape", TENSOR_FILES, True, _tensor_edit(lambda t: t.update({sorted(t)[0]: t[sorted(t)[0]][:-1]}))),
    ("tensor-nan", TENSOR_FILES, True, _tensor_edit(_nan)),
    ("tensor-header", TENSOR_FILES, True, lambda d, _: struct.pack("<Q", 2**62) + d[8:]),
]
SEMANTIC: list[tuple[str, str, Any, list[str]]] = [
    # (kind, file, transform, names the error may give besides the file)
    ("negative-counter", "learner.json", _json_edit(_set("global_step", -1)), []),
    ("negative-counter", "memory.json", _json_edit(_set("seen", -1)), []),
    ("negative-counter", "manifest.json", _json_edit(_set("updates_done", -1)), []),
    ("updates-mismatch", "learner.json", _json_edit(_set("updates_done", 7)), []),
    ("task-ids-mismatch", "learner.json", _json_edit(_set("task_ids_seen", ["t1", "t9"])), []),
    ("bad-task-id", "learner.json", _json_edit(_set("task_ids_seen", [3])), []),
    ("memory-size", "memory.json", _json_edit(_set("memory_size", 41)), []),
    ("metadata-names", "memory.json", _json_edit(_set("metadata_names", ["../x"])), []),
    ("label-out-of-range", "memory.safetensors", _tensor_edit(lambda t: t["targets"].fill_(99)), []),
    ("newer-version", "manifest.json", _json_edit(_set("format_version", 2)), []),
    ("version-zero", "manifest.json", _json_edit(_set("format_version", 0)), []),
    ("other-format", "manifest.json", _json_edit(_set("format", "pytorch-lightning")), []),
    ("other-method", "manifest.json", _json_edit(_set("method", "DarkExperienceReplayModelUpdater")), []),
    (
        "other-model-shape",
        "manifest.json",
        _json_edit(
            lambda o: {
                **o,
                "model": {**o["model"], "hyperparameters": {**o["model"]["hyperparameters"], "hidden_sizes": [16]}},
            }
        ),
        [],
    ),
    (
        "unregistered-class",
        "manifest.json",
        _json_edit(lambda o: {**o, "model": {**o["model"], "class": "Popen"}}),
        [],
    ),
    (
        "hostile-hyperparameters",
        "manifest.json",
        _json_edit(lambda o: {**o, "model": {**o["model"], "hyperparameters": {"num_inputs": "rm -rf /"}}}),
        [],
    ),
    ("bad-head-id", "manifest.json", _json_edit(lambda o: {**o, "model": {**o["model"], "task_ids": ["../t1"]}}), []),
    (
        "entry-type",
        "manifest.json",
        _json_edit(lambda o: {**o, "files": {**o["files"], "learner.json": {"sha256": 1, "bytes": "2"}}}),
        [],
    ),
]
OUTSIDE_NAMES = [
    "../model.safetensors",
    "/etc/passwd",
    "sub/model.safetensors",
    "MODEL.safetensors",
    "x.pkl",
    ".hidden.json",
]

CASES = (
    [pytest.param(name, kind, id=f"{name}:{kind}") for kind, names, _, _ in KINDS for name in names]
    + [pytest.param(name, kind, id=f"{name}:{kind}") for kind, name, _, _ in SEMANTIC]
    + [pytest.param("manifest.json", f"outside-name:{n}", id=f"manifest.json:outside-name:{n}") for n in OUTSIDE_NAMES]
    + [
        pytest.param("(folder)", "unexpected-file", id="unexpected-file"),
        pytest.param("(folder)", "unexpected-dir", id="unexpected-dir"),
    ]
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "state"
    updater = build_updater({**JOB, "output": str(folder)})
    from test_rel_support import synthetic_data

    updater.update(synthetic_data(11, JOB["items"]), task_id="t1")
    return folder


def _signed(kind: str) -> bool:
    """Whether the corrupted file's checksum was updated in the manifest."""
    kinds = {k: signed for k, _, signed, _ in KINDS}
    return kinds.get(kind, kind in {k for k, *_ in SEMANTIC})


def _resign(folder: Path, name: str) -> None:
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest))


def _corrupt(folder: Path, name: str, kind: str, marker: Path) -> None:
    path = folder / name
    if kind == "unexpected-file":
        (folder / "notes.json").write_text("{}")
        return
    if kind == "unexpected-dir":
        (folder / "extra").mkdir()
        return
    if kind.startswith("outside-name:"):
        outside = kind.split(":", 1)[1]
        manifest = json.loads(path.read_bytes())
        manifest["files"][outside] = manifest["files"].pop("model.safetensors")
        path.write_text(json.dumps(manifest))
        return
    spec = {k: (signed, transform) for k, _, signed, transform in KINDS}
    semantic = {(k, n): t for k, n, t, _ in SEMANTIC}
    signed, transform = spec[kind] if kind in spec else (name != "manifest.json", semantic[(kind, name)])
    if transform == "missing":
        path.unlink()
        return
    if transform == "directory":
        path.unlink()
        path.mkdir()
        return
    if transform == "symlink":
        outside = folder.parent / f"outside-{name}"
        shutil.copyfile(path, outside)  # identical bytes: only the link itself is wrong
        path.unlink()
        path.symlink_to(outside)
        return
    data = pickle.dumps(_Payload(str(marker))) if transform == "pickle" else transform(path.read_bytes(), path)
    path.write_bytes(data)
    if signed and name != "manifest.json":
        _resign(folder, name)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something tried to unpickle a state file")

    for module, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, trap)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_corrupt_or_hostile_state_is_refused(
    name: str, kind: str, pristine: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = tmp_path / "state"
    shutil.copytree(pristine, folder)
    marker = tmp_path / "payload-ran"
    _corrupt(folder, name, kind, marker)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}
    request.getfixturevalue("no_unpickling")
    expected_names = {name, "notes.json", "extra"} if name == "(folder)" else {name}
    if kind in ("updates-mismatch", "task-ids-mismatch"):
        expected_names.add("manifest")
    with pytest.raises(StateError, match=re.escape(str(folder))) as err:
        build_updater({**JOB, "input": str(folder)})
    message = str(err.value)
    assert any(n in message for n in expected_names), f"the error does not name {expected_names}: {message}"
    try:
        load_model(folder)
    except StateError:
        pass
    else:  # it reads and checks only the manifest and the model (and every file's checksum)
        signed_elsewhere = name in ("learner.json", "memory.json", TENSOR_FILES[1], TENSOR_FILES[2]) and _signed(kind)
        assert signed_elsewhere or kind == "other-method", "load_model accepted a corrupt folder"
    assert not marker.exists(), "a pickle payload was executed"
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()} == before, "loading wrote"
    _tried.append(f"{name}:{kind}")


def test_pristine_state_loads(pristine: Path) -> None:
    updater = build_updater({**JOB, "input": str(pristine)})
    assert updater.learner.updates_done == 1 and len(updater.learner.memory) == 40
    assert load_model(pristine).task_ids == ["default_task", "t1"]


def test_report_how_many_corruptions_were_tried(capsys: Any) -> None:
    if len(_tried) != len(CASES):
        pytest.skip("the count is reported when the whole file runs")
    assert len(set(_tried)) == len(CASES), "a corruption case was counted twice"
    with capsys.disabled():
        files = sorted({c.split(":")[0] for c in _tried})
        print(
            f"\n[hostile state] {len(_tried)} corrupted folders refused with a StateError naming the file "
            f"({len(files)} targets: {', '.join(files)}); no payload ran, nothing was unpickled"
        )
