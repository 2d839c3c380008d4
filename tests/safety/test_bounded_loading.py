"""Loading is bounded before it allocates, and a well-formed but wrong state is refused at load
with one StateError naming the file and the field (issue: safe output paths, findings 4, 5, 8)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    ModelUpdater,
    MultiLayerPerceptron,
    StateError,
    load_model,
)
from retain.state import StateFolder

OPTIONS: dict[str, Any] = {"batch_size": 32, "max_epochs": 1, "seed": 0, "accelerator": "cpu"}


def _updater(cls: type[ModelUpdater], **kwargs: Any) -> ModelUpdater:
    torch.manual_seed(0)
    return cls(MultiLayerPerceptron(64, 10, [16]), optimizer=functools.partial(torch.optim.SGD, lr=0.05),
               memory_size=30, **OPTIONS, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def der_state(tmp_path_factory: pytest.TempPathFactory, digits_tasks) -> Path:
    folder = tmp_path_factory.mktemp("der") / "state"
    _updater(DarkExperienceReplayModelUpdater, output_state_folder=folder).update(digits_tasks[0][0])
    return folder


@pytest.fixture
def state(der_state: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(der_state, copy)
    return copy


def _reseal(folder: Path, name: str) -> None:
    """Updates the manifest entry of ``name`` so that only a content check can catch the edit."""
    data = (folder / name).read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        target = manifest
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_tensors(folder: Path, name: str, edit) -> None:
    tensors = load_file(str(folder / name))
    edit(tensors)
    save_file(tensors, str(folder / name))
    _reseal(folder, name)


def _edit_json(folder: Path, name: str, edit) -> None:
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))
    _reseal(folder, name)


def _resume(folder: Path) -> ModelUpdater:
    return _updater(DarkExperienceReplayModelUpdater, input_state_folder=folder)


# --------------------------------------------------------------- finding 4: resources before checks
_PEAK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import retain
try:
    retain.load_model(sys.argv[1])
except retain.StateError as err:
    print("REFUSED", str(err)[:300])
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's peak across exec)
print("MAXRSS_KB", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _load_in_limited_process(folder: Path, limit_gb: float = 6.0) -> tuple[str, int]:
    code = textwrap.dedent(_PEAK.format(limit=int(limit_gb * 2**30)))
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = next((line for line in proc.stdout.splitlines() if line.startswith("REFUSED")), "")
    rss = int(next(line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")).split()[1])
    return refused, rss


@pytest.mark.parametrize(
    "hidden, message",
    [
        ([100] * 700_000, "hyperparameters hold more than 4096 values"),  # a 3.5 MB manifest (the cap is 4 MiB)
        ([10**6, 10**6, 10**6], "does not fit: unexpected tensors"),  # 3e12 parameters asked: checked on meta
    ],
)
def test_manifest_asking_for_a_huge_model_is_refused_with_little_memory(
    state: Path, hidden: list[int], message: str
) -> None:
    _edit_manifest(state, model__hyperparameters__hidden_sizes=hidden)
    refused, rss_kb = _load_in_limited_process(state)
    assert message in refused, refused
    assert rss_kb < 1_000_000, f"peak RSS {rss_kb} kB while refusing"


def test_too_many_task_ids_are_refused_before_heads_are_built(state: Path) -> None:
    _edit_manifest(state, model__task_ids=[f"t{i}" for i in range(300_000)])
    with pytest.raises(StateError, match="must be a list of at most 100000 task ids"):
        load_model(state)
    _edit_manifest(state, model__task_ids=[f"t{i}" for i in range(50_000)])
    with pytest.raises(StateError, match="too few for the 50000 task heads listed"):
        load_model(state)
    with pytest.raises(StateError, match="too few for the 50000 task heads listed"):
        _resume(state)


def test_a_huge_listed_file_is_checksummed_by_streaming_not_read_whole(state: Path) -> None:
    big = state / "model.safetensors"
    with open(big, "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: the manifest below lists its size, the checksum is wrong
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["bytes"] = 1 << 30
    (state / "manifest.json").write_text(json.dumps(manifest))
    refused, rss_kb = _load_in_limited_process(state)
    assert "model.safetensors: checksum mismatch" in refused, refused
    assert rss_kb < 700_000, f"peak RSS {rss_kb} kB while checksumming a 1 GiB file"


@pytest.mark.parametrize(
    "header, message",
    [
        (b'{"x":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4]}}', "needs 4000000000000 bytes"),
        (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],'
         b'"data_offsets":[0,4]}}', "overlaps or leaves a gap"),
        (b'{"x":{"dtype":"PICKLE","shape":[1],"data_offsets":[0,4]}}', "unknown dtype"),
        (b"[" * 100 + b"]" * 100, "nested deeper than 32 levels"),
    ],
)
def test_hostile_tensor_headers_are_refused_before_allocation(state: Path, header: bytes, message: str) -> None:
    raw = header + b" " * (-len(header) % 8)
    (state / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    _reseal(state, "model.safetensors")
    with pytest.raises(StateError, match=message):
        load_model(state)


def test_deep_json_is_refused(state: Path) -> None:
    (state / "learner.json").write_text("[" * 50 + "]" * 50)
    _reseal(state, "learner.json")
    with pytest.raises(StateError, match=r"learner\.json: JSON nested deeper than 32 levels"):
        _resume(state)


# ---------------------------------------------------------------- finding 5: a well-formed wrong memory
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_memory_targets_of_another_integer_dtype_are_refused_at_load(state: Path, dtype: torch.dtype) -> None:
    _edit_tensors(state, "memory.safetensors", lambda t: t.update(targets=t["targets"].to(dtype)))
    message = r"memory\.safetensors: memory state: targets must be a 1-D int64 tensor, got torch\.int"
    with pytest.raises(StateError, match=message):
        _resume(state)


def test_integer_stored_logits_are_refused_at_load(state: Path) -> None:
    _edit_tensors(state, "memory.safetensors",
                  lambda t: t.update({"metadata.logits": t["metadata.logits"].round().to(torch.int64)}))  # fmt: skip
    message = r"memory\.safetensors: memory state: metadata column 'logits' must be floating point"
    with pytest.raises(StateError, match=message):
        _resume(state)


def test_a_der_memory_without_its_logits_column_is_refused_at_load(state: Path) -> None:
    _edit_tensors(state, "memory.safetensors", lambda t: t.pop("metadata.logits"))
    _edit_json(state, "memory.json", lambda m: m.update(metadata_names=[]))
    message = r"memory\.safetensors: memory state: metadata column 'logits' is missing \(the method needs it\)"
    with pytest.raises(StateError, match=message):
        _resume(state)


def test_logits_of_the_wrong_width_are_refused_at_load(state: Path) -> None:
    _edit_tensors(state, "memory.safetensors",
                  lambda t: t.update({"metadata.logits": t["metadata.logits"][:, :7].contiguous()}))  # fmt: skip
    with pytest.raises(StateError, match=r"memory.safetensors: .*logits.* per-item shape"):
        _resume(state)


@pytest.mark.parametrize("seen", [2**53 + 1, -1, 10])
def test_memory_counters_out_of_range_are_refused(state: Path, seen: int) -> None:
    _edit_json(state, "memory.json", lambda m: m.update(seen=seen))
    with pytest.raises(StateError, match=r"memory"):
        _resume(state)


def test_an_er_state_can_not_be_continued_as_der_even_when_names_match(tmp_path: Path, digits_tasks) -> None:
    er = tmp_path / "er"
    _updater(ExperienceReplayModelUpdater, output_state_folder=er).update(digits_tasks[0][0])
    _edit_manifest(er, method="DarkExperienceReplayModelUpdater")
    _reseal(er, "memory.json")
    with pytest.raises(StateError, match="metadata column 'logits' is missing"):
        _resume(er)


# -------------------------------------------------------------- finding 8: names and printed text
@pytest.mark.parametrize("task_id", ["t1\n", "t1 ", "", "a" * 129])
def test_task_ids_must_match_their_pattern_on_the_whole_string(state: Path, task_id: str) -> None:
    _edit_manifest(state, task_ids_seen=[task_id])
    with pytest.raises(StateError, match="task_ids_seen must list distinct task ids"):
        StateFolder(state)


def test_manifest_text_reaches_the_terminal_with_control_characters_escaped(state: Path, tmp_path: Path) -> None:
    _edit_manifest(state, method="Evil\x1b[2J\x1b[31mUpdater\n")
    config = tmp_path / "cfg.py"
    repo = Path(__file__).resolve().parents[2]
    config.write_text((repo / "examples" / "digits_config.py").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "retain.cli", "update", "--config", str(config), "--input-state", str(state),
         "--output-state", str(tmp_path / "next")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "\x1b" not in proc.stderr and proc.stderr.count("\n") == 1, repr(proc.stderr)
    assert "Evil\\x1b[2J\\x1b[31mUpdater\\n" in proc.stderr
