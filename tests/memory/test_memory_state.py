"""ReservoirMemory.load_state_dict validates its own format: every refusal is one ValueError line
naming the field, and a refused state leaves the memory as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from retain.memory import MemoryStateError, ReservoirMemory

State = tuple[dict[str, Any], dict[str, torch.Tensor]]


def _state(nested: bool = True) -> State:
    memory = ReservoirMemory(6, seed=0, pad_values={"ids": -1})
    for start in range(0, 10, 5):
        ids = torch.arange(start, start + 5)
        inputs: Any = ids.float()[:, None]
        if nested:
            inputs = {"ids": ids.unsqueeze(1).repeat(1, 3), "x": ids.float().unsqueeze(1)}
        memory.add(inputs, ids % 4, {"logits": ids.float().unsqueeze(1).repeat(1, 4)})
    return memory.state_dict()


def _edit(fn: Callable[[dict, dict], None], nested: bool = True) -> State:
    meta, tensors = _state(nested)
    meta, tensors = copy.deepcopy(meta), dict(tensors)
    fn(meta, tensors)
    return meta, tensors


def _set(d: dict, key: str, value: Any) -> None:
    d[key] = value


CASES: list[tuple[str, Callable[[dict, dict], None], str]] = [
    ("unknown-field", lambda m, t: _set(m, "extra", 1), r"unknown field\(s\) \['extra'\]"),
    ("missing-field", lambda m, t: m.pop("seen"), r"field 'seen' is missing"),
    ("seen-type", lambda m, t: _set(m, "seen", True), r"seen must be an integer, got True"),
    ("size-type", lambda m, t: _set(m, "memory_size", 6.0), r"memory_size must be an integer, got 6.0"),
    ("size-bool", lambda m, t: _set(m, "memory_size", True), r"memory_size must be an integer, got True"),
    (
        "seen-past-2**53",
        lambda m, t: _set(m, "seen", 2**53 + 1),
        r"seen must lie in \[0, 2\*\*53\] .*got 9007199254740993",
    ),
    (
        "names-type",
        lambda m, t: _set(m, "metadata_names", "logits"),
        r"metadata_names must be a list of identifiers, got",
    ),
    (
        "names-int",
        lambda m, t: _set(m, "metadata_names", [3]),
        r"metadata_names must be a list of identifiers, got \[3\]",
    ),
    ("names-repeated", lambda m, t: _set(m, "metadata_names", ["logits", "logits"]), r"must be sorted and unique"),
    (
        "leaves-list",
        lambda m, t: _set(m, "input_leaves", []),
        r"input_leaves must describe the leaves \['ids', 'x'\], got \[\]",
    ),
    (
        "leaf-spec-int",
        lambda m, t: m["input_leaves"].__setitem__("x", 3),
        r"input_leaves\['x'\] must be \{'dtype', 'shape'\}, got 3",
    ),
    (
        "leaf-spec-list",
        lambda m, t: m["input_leaves"].__setitem__("x", ["dtype", "shape"]),
        r"input_leaves\['x'\] must be",
    ),
    (
        "leaf-spec-extra",
        lambda m, t: m["input_leaves"]["x"].update(pad=0),
        r"input_leaves\['x'\] must be \{'dtype', 'sha",
    ),
    ("leaf-dtype-int", lambda m, t: m["input_leaves"]["x"].update(dtype=3), r"input_leaves\['x'\]: unknown dtype 3"),
    (
        "leaf-shape-int",
        lambda m, t: m["input_leaves"]["x"].update(shape=1),
        r"input_leaves\['x'\]: shape must be a list",
    ),
    (
        "leaf-shape-bool",
        lambda m, t: m["input_leaves"]["x"].update(shape=[True]),
        r"input_leaves\['x'\]: shape must be",
    ),
    (
        "pad-missing-in-state",
        lambda m, t: _set(m, "pad_values", {}),
        r"input leaf 'ids' was padded with 0, this memory pads it with -1",
    ),
    (
        "pad-nan",
        lambda m, t: _set(m, "pad_values", {"ids": float("nan")}),
        r"pad value of input leaf 'ids' must be a finite",
    ),
    (
        "metadata-scalar",
        lambda m, t: _set(t, "metadata.logits", torch.tensor(1.0)),
        r"'metadata.logits' has shape \(\), expected 6 rows",
    ),
    ("tensors-not-tensors", lambda m, t: _set(t, "targets", [1, 2]), r"tensors must be a dict of tensors"),
    (
        "generator-2d",
        lambda m, t: _set(t, "generator_state", t["generator_state"][None]),
        r"generator_state must be a 1-D",
    ),
    ("generator-missing", lambda m, t: t.pop("generator_state"), r"generator_state must be a 1-D uint8 tensor"),
    ("seen-negative", lambda m, t: _set(m, "seen", -1), r"seen must lie in \[0, 2\*\*53\] .*, got -1"),
    ("seen-huge", lambda m, t: _set(m, "seen", 2**63), r"seen must lie in \[0, 2\*\*53\]"),
    ("memory-size", lambda m, t: _set(m, "memory_size", 7), r"memory of size 7, this one has memory_size=6"),
    ("names-order", lambda m, t: _set(m, "metadata_names", ["z", "a"]), r"metadata_names must be sorted and unique"),
    ("names-chars", lambda m, t: _set(m, "metadata_names", ["../x"]), r"metadata_names must be a list of identifiers"),
    ("structure", lambda m, t: _set(m, "input_structure", {"set": []}), r"input_structure: nested structure: unknown"),
    ("leaves", lambda m, t: m["input_leaves"].pop("x"), r"input_leaves must describe the leaves \['ids', 'x'\]"),
    ("leaf-dtype-name", lambda m, t: m["input_leaves"]["x"].update(dtype="str"), r"input_leaves\['x'\]: unknown dtype"),
    ("leaf-shape-spec", lambda m, t: m["input_leaves"]["x"].update(shape=[-1]), r"input_leaves\['x'\]: shape must be"),
    ("pad-value", lambda m, t: _set(m, "pad_values", {"ids": "a"}), r"pad value of input leaf 'ids' must be a finite"),
    (
        "generator-dtype",
        lambda m, t: _set(t, "generator_state", t["generator_state"].long()),
        r"generator_state must be a 1-D uint8",
    ),
    (
        "generator-size",
        lambda m, t: _set(t, "generator_state", t["generator_state"][:16]),
        r"generator_state \(16 bytes\) does not fit a cpu generator",
    ),
    ("unknown-tensor", lambda m, t: _set(t, "injected", torch.zeros(3)), r"unknown tensor\(s\) \['injected'\]"),
    ("missing-tensor", lambda m, t: t.pop("inputs.x"), r"tensor\(s\) \['inputs.x'\] missing"),
    (
        "leaf-dtype",
        lambda m, t: _set(t, "inputs.ids", t["inputs.ids"].int()),
        r"tensor 'inputs.ids' is torch.int32 \(6, 3\), expected torch.int64 \(6, 3\)",
    ),
    (
        "leaf-shape",
        lambda m, t: _set(t, "inputs.ids", t["inputs.ids"][:, :2]),
        r"tensor 'inputs.ids' is torch.int64 \(6, 2\), expected",
    ),
    (
        "leaf-rows",
        lambda m, t: _set(t, "inputs.x", t["inputs.x"][:5]),
        r"tensor 'inputs.x' is torch.float32 \(5, 1\), expected torch.float32 \(6, 1\)",
    ),
    (
        "targets-dtype",
        lambda m, t: _set(t, "targets", t["targets"].int()),
        r"targets must be a 1-D int64 tensor, got torch.int32",
    ),
    ("targets-dims", lambda m, t: _set(t, "targets", t["targets"][:, None]), r"targets must be a 1-D int64 tensor"),
    ("targets-rows", lambda m, t: _set(t, "targets", t["targets"][:4]), r"tensor 'targets' has 4 rows, expected 6"),
    ("targets-range", lambda m, t: t["targets"].__setitem__(0, 9), r"targets must lie in \[0, 3\]"),
    ("targets-negative", lambda m, t: t["targets"].__setitem__(0, -1), r"targets must lie in \[0, 3\]"),
    (
        "metadata-rows",
        lambda m, t: _set(t, "metadata.logits", t["metadata.logits"][:3]),
        r"'metadata.logits' has shape \(3, 4\), expected 6 rows",
    ),
    (
        "nan-input",
        lambda m, t: t["inputs.x"].__setitem__((0, 0), float("nan")),
        r"tensor 'inputs.x' contains NaN or Inf",
    ),
    (
        "inf-metadata",
        lambda m, t: t["metadata.logits"].__setitem__((1, 1), float("inf")),
        r"'metadata.logits' contains NaN or Inf",
    ),
]  # fmt: skip


@pytest.mark.parametrize("kind, edit, message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_state_is_refused_naming_the_field_and_changes_nothing(
    kind: str, edit: Callable[[dict, dict], None], message: str
) -> None:
    meta, tensors = _edit(edit)
    memory = ReservoirMemory(6, seed=1, pad_values={"ids": -1})
    memory.add({"ids": torch.zeros(1, 3, dtype=torch.long), "x": torch.ones(1, 1)}, torch.zeros(1, dtype=torch.long))
    before = (memory.seen, memory.generator.get_state().clone(), memory.raw_items()[0]["x"].clone())
    with pytest.raises(ValueError, match=message) as info:
        memory.load_state_dict(meta, tensors, num_classes=4, required_metadata={"logits": (4,)})
    assert str(info.value).startswith("memory state: ") and "\n" not in str(info.value)
    assert memory.seen == before[0] and torch.equal(memory.generator.get_state(), before[1])
    assert torch.equal(memory.raw_items()[0]["x"], before[2])


@pytest.mark.parametrize(
    "required, message",
    [
        ({"features": None}, r"metadata column 'features' is missing \(the method needs it\)"),
        ({"logits": (5,)}, r"metadata column 'logits' has per-item shape \(4,\), expected \(5,\)"),
    ],
)
def test_required_metadata_columns(required: dict, message: str) -> None:
    memory = ReservoirMemory(6, pad_values={"ids": -1})
    with pytest.raises(ValueError, match=message):
        memory.load_state_dict(*_state(), required_metadata=required)
    memory.load_state_dict(*_state(), required_metadata={"logits": (4,)})
    assert len(memory) == 6


def test_required_metadata_must_be_floating_point() -> None:
    memory = ReservoirMemory(4)
    memory.add(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), {"ids": torch.arange(3)[:, None]})
    with pytest.raises(ValueError, match=r"metadata column 'ids' must be floating point, got torch.int64"):
        ReservoirMemory(4).load_state_dict(*memory.state_dict(), required_metadata={"ids": None})


def test_a_description_that_is_not_an_object_is_refused() -> None:
    _, tensors = _state()
    with pytest.raises(MemoryStateError, match=r"^memory state: the description must be a JSON object, got list$"):
        ReservoirMemory(6, pad_values={"ids": -1}).load_state_dict([], tensors)  # type: ignore[arg-type]


def test_a_state_without_the_nested_fields_loads_as_a_single_tensor() -> None:
    """States written before nested inputs (and the DDP shards) carry only the three counters."""
    meta, tensors = _state(nested=False)
    legacy = {k: meta[k] for k in ("memory_size", "seen", "metadata_names")}
    memory = ReservoirMemory(6, pad_values={"ids": -1})
    memory.load_state_dict(legacy, tensors, num_classes=4)
    assert memory.structure == "tensor" and torch.equal(memory.raw_items()[0], tensors["inputs"])
    with pytest.raises(ValueError, match="input_structure is missing"):
        nested_meta, nested_tensors = _state()
        ReservoirMemory(6).load_state_dict({k: nested_meta[k] for k in legacy}, nested_tensors)


def test_an_empty_memory_state_round_trips() -> None:
    meta, tensors = ReservoirMemory(5, seed=4).state_dict()
    assert meta["input_structure"] is None and set(tensors) == {"generator_state"}
    memory = ReservoirMemory(5)
    memory.load_state_dict(meta, tensors)
    assert len(memory) == 0 and memory.inputs is None
    with pytest.raises(ValueError, match=r"unknown tensor\(s\) \['inputs'\]"):
        ReservoirMemory(5).load_state_dict(meta, {**tensors, "inputs": torch.zeros(0, 1)})


def test_errors_say_whether_the_description_or_the_tensors_are_at_fault() -> None:
    """So the updater can name memory.json or memory.safetensors in its StateError."""
    for edit, in_json in [
        (lambda m, t: _set(m, "seen", -1), True),
        (lambda m, t: m.pop("pad_values"), True),  # the nested fields come all three or not at all
        (lambda m, t: _set(t, "targets", t["targets"].int()), False),
        (lambda m, t: _set(t, "generator_state", t["generator_state"][:16]), False),
    ]:
        meta, tensors = _edit(edit)
        with pytest.raises(MemoryStateError) as info:
            ReservoirMemory(6, pad_values={"ids": -1}).load_state_dict(meta, tensors)
        assert info.value.in_json is in_json, str(info.value)
    with pytest.raises(MemoryStateError, match="field 'pad_values' is missing"):
        ReservoirMemory(6, pad_values={"ids": -1}).load_state_dict(*_edit(lambda m, t: m.pop("pad_values")))


def test_a_state_is_read_straight_into_the_columns_it_loads_into(tmp_path) -> None:
    """load_buffers + StateFolder.tensors(into=) hold a loaded memory once: the column adopted is the
    buffer the file was read into, and the memory equals one loaded the plain way."""
    from retain.state import StateFolder, write_state

    source = ReservoirMemory(50, seed=3)
    source.add(torch.rand(80, 2, 3), torch.arange(80) % 4, {"logits": torch.randn(80, 4)})
    meta, tensors = source.state_dict()
    manifest = {"retain_version": "t", "method": "m", "model": {"class": "c", "hyperparameters": {}, "task_ids": []},
                "method_options": {}, "options": {}, "updates_done": 0, "task_ids_seen": []}  # fmt: skip
    folder = write_state(tmp_path / "s", manifest, {"memory.json": meta}, {"memory.safetensors": tensors})
    state = StateFolder(folder)
    loaded = ReservoirMemory(50, seed=0)
    buffers = loaded.load_buffers(meta, state.tensor_header("memory.safetensors"))
    assert set(buffers) == {"inputs", "targets", "metadata.logits"}
    read = state.tensors("memory.safetensors", into=buffers)
    assert read["inputs"].data_ptr() == buffers["inputs"].data_ptr()
    loaded.load_state_dict(meta, read, num_classes=4)
    assert loaded.columns[""].data_ptr() == buffers["inputs"].data_ptr()  # adopted, not copied
    plain = ReservoirMemory(50, seed=0)
    plain.load_state_dict(meta, StateFolder(folder).tensors("memory.safetensors"), num_classes=4)
    for name, value in plain.state_dict()[1].items():
        assert torch.equal(value, loaded.state_dict()[1][name]), name
    a, b = loaded.sample(7), plain.sample(7)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.inputs, b.inputs)
