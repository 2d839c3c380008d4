"""Joint with nested inputs through chunk files: dict items of variable-length sequences, one
chunk per update at its own length, batches padded to the longest chunk with the declared pad value."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from first_epoch import FirstEpoch
from padded_sequences import PAD, MaskedMean, pad_collate
from retain import JointModelUpdater, StateError, nested
from retain.batching import BatchSource, NestedTensorDataset
from retain.chunks import ChunkedBatchSource, ChunkedDataset, chunk_name, map_chunk
from retain.state import StateFolder, write_state

MAX_LENGTHS = (5, 12, 3)  # the longest sequence of each update: the middle chunk is the longest
OPTIONS = {"batch_size": 8, "max_epochs": 2, "seed": 4, "accelerator": "cpu", "pad_values": {"input_ids": PAD}}


class Sequences(Dataset):
    """Items ``{"input_ids": (L,), "labels": c}``, L in [2, longest], classes ``2k`` and ``2k + 1``."""

    def __init__(self, k: int, n: int = 40) -> None:
        g = torch.Generator().manual_seed(50 + k)
        self.items = []
        for i in range(n):
            length = MAX_LENGTHS[k] if i == 0 else int(torch.randint(2, MAX_LENGTHS[k] + 1, (1,), generator=g))
            self.items.append((torch.randint(8, 40, (length,), generator=g), 2 * k + i % 2))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        return {"input_ids": self.items[i][0], "labels": self.items[i][1]}


def _updater(input_folder: Path | None, output_folder: Path | None, **options) -> JointModelUpdater:
    torch.manual_seed(0)
    return JointModelUpdater(
        MaskedMean(6), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        input_state_folder=input_folder, output_state_folder=output_folder, **(OPTIONS | options),
    )  # fmt: skip


def _update(k: int, input_folder: Path | None, output_folder: Path | None) -> JointModelUpdater:
    updater = _updater(input_folder, output_folder)
    updater.update(Sequences(k), train_dataset_collate_fn=pad_collate)
    return updater


def _run(tmp_path: Path, updates: int) -> list[Path]:
    folders: list[Path] = []
    for k in range(updates):
        _update(k, folders[-1] if folders else None, tmp_path / f"s{k}")
        folders.append(tmp_path / f"s{k}")
    return folders


def _expected_chunk(k: int) -> dict[str, Tensor]:
    """What update ``k`` keeps: its items padded to its own longest one (batches of 512 collated)."""
    batch = pad_collate([Sequences(k)[i] for i in range(len(Sequences(k)))])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "targets": batch["labels"]}


def test_each_update_keeps_its_own_chunk_at_its_own_length_and_learner_json_its_structure(tmp_path: Path) -> None:
    s0, s1, s2 = _run(tmp_path, 3)
    assert (s2 / chunk_name(0)).stat().st_ino == (s0 / chunk_name(0)).stat().st_ino  # linked, not rewritten
    assert (s2 / chunk_name(1)).stat().st_ino == (s1 / chunk_name(1)).stat().st_ino
    learner_json = json.loads((s2 / "learner.json").read_text())
    assert learner_json["chunks"] == [chunk_name(i) for i in range(3)]
    structure = json.loads(learner_json["input_structure"])
    assert structure == {"dict": [["input_ids", "tensor"], ["attention_mask", "tensor"]]}
    assert json.loads(learner_json["pad_values"]) == {"input_ids": PAD}
    state = StateFolder(s2)
    for k in range(3):
        header = state.tensor_header(chunk_name(k))
        assert sorted(header) == ["inputs.attention_mask", "inputs.input_ids", "targets"]
        assert header["inputs.input_ids"] == (torch.int64, (40, MAX_LENGTHS[k]))  # its own length, not 12
        x, y = map_chunk(state.mapped_file(chunk_name(k)), structure)
        expected = _expected_chunk(k)
        assert torch.equal(x["input_ids"], expected["input_ids"]) and torch.equal(y, expected["targets"])
        assert torch.equal(x["attention_mask"], expected["attention_mask"])


def test_batches_over_nested_chunks_equal_batches_of_the_padded_concatenation(tmp_path: Path) -> None:
    folders = _run(tmp_path, 2)
    updater = _updater(folders[-1], tmp_path / "s2")
    learner = updater.learner
    epoch = FirstEpoch(learner)
    updater.update(Sequences(2), train_dataset_collate_fn=pad_collate)
    assert isinstance(epoch.source, ChunkedBatchSource)
    seen = epoch.batches
    parts = [_expected_chunk(k) for k in range(3)]
    joined = nested.cat([{"input_ids": p["input_ids"], "attention_mask": p["attention_mask"]} for p in parts],
                        {"input_ids": PAD})  # fmt: skip
    reference = BatchSource(
        NestedTensorDataset(joined, torch.cat([p["targets"] for p in parts])), learner.train_batch_size,
        learner.device, shuffle=True, generator=epoch.generator(),
    )  # fmt: skip
    expected = list(reference)
    assert len(seen) == len(expected) == len(epoch.source) == 15
    for (x, y), (ex, ey) in zip(seen, expected, strict=True):
        assert list(x) == ["input_ids", "attention_mask"] and x["input_ids"].shape[1] == 12
        assert torch.equal(x["input_ids"], ex["input_ids"]) and torch.equal(y, ey)
        assert torch.equal(x["attention_mask"], ex["attention_mask"])
    ids = torch.cat([x["input_ids"] for x, _ in seen])
    masks = torch.cat([x["attention_mask"] for x, _ in seen])
    assert bool(((masks == 0) == (ids == PAD)).all()), "padding is the declared pad id with mask 0"
    assert sorted(learner.seen_targets.tolist()) == sorted(torch.cat([y for _, y in seen]).tolist())


@pytest.mark.parametrize("window_bytes", [32 * 2**20, 3 * 8 * 16], ids=["one-window", "windows-of-three-batches"])
def test_chunked_dataset_pads_each_leaf_to_the_longest_chunk(window_bytes: int, monkeypatch) -> None:
    monkeypatch.setattr(ChunkedBatchSource, "WINDOW_BYTES", window_bytes)
    g = torch.Generator().manual_seed(0)
    chunks = [
        ({"a": torch.randint(0, 9, (n, length), generator=g), "b": (torch.rand(n, 2, length2, generator=g),)},
         torch.full((n,), c))
        for c, (n, length, length2) in enumerate([(3, 4, 1), (5, 2, 3), (1, 6, 2), (4, 4, 3)])
    ]  # fmt: skip
    pads = {"a": -1, "b.0": 0.5}
    data = ChunkedDataset(chunks, pads)
    every = nested.cat([x for x, _ in chunks], pads)
    targets = torch.cat([y for _, y in chunks])
    assert data.shapes == {"a": (6,), "b.0": (2, 3)} and len(data) == 13
    item, label = data[4]  # second chunk, padded
    assert torch.equal(item["a"], every["a"][4]) and torch.equal(item["b"][0], every["b"][0][4]) and int(label) == 1
    assert int((item["a"] == -1).sum()) == 4
    source = ChunkedBatchSource(data, 2, torch.device("cpu"), shuffle=True, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(13, generator=torch.Generator().manual_seed(5))
    batches = list(source)
    assert len(batches) == len(source) == 7
    for i, (x, y) in enumerate(batches):
        idx = order[2 * i : 2 * i + 2]
        assert isinstance(x["b"], tuple) and torch.equal(x["a"], every["a"][idx]) and torch.equal(y, targets[idx])
        assert torch.equal(x["b"][0], every["b"][0][idx])
    subset = ChunkedBatchSource(data, 2, torch.device("cpu"), shuffle=False, indices=torch.tensor([12, 0, 5]))
    got = list(subset)
    assert [b[1].tolist() for b in got] == [[3, 0], [1]]
    assert torch.equal(got[1][0]["a"], every["a"][[5]])


def test_chunks_of_another_structure_are_refused() -> None:
    with pytest.raises(ValueError, match=r"chunks differ: chunk 1 has inputs \{'dict'"):
        ChunkedDataset([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)),
                        ({"x": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long))])  # fmt: skip
    with pytest.raises(ValueError, match=r"chunks differ: inputs.x of chunk 1 is torch.int64"):
        ChunkedDataset([({"x": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long)),
                        ({"x": torch.zeros(2, 3, dtype=torch.long)}, torch.zeros(2, dtype=torch.long))])  # fmt: skip


_CONTINUE = """
import sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {shared!r}]
from pathlib import Path
from test_joint_nested import _update
_update(2, Path({src!r}), Path({out!r}))
"""


def test_nested_chunked_state_continues_byte_identically_in_a_new_process(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    _update(2, s1, tmp_path / "here")
    here = Path(__file__)
    script = _CONTINUE.format(tests=str(here.parent), shared=str(here.parents[1]), src=str(s1),
                              out=str(tmp_path / "there"))
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "there").iterdir())
    assert [n for n in names if n.startswith("chunk_")] == [chunk_name(i) for i in range(3)]
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name
    reloaded = _updater(tmp_path / "there", None).learner
    assert [tuple(x["input_ids"].shape) for x, _ in reloaded.chunks] == [(40, n) for n in MAX_LENGTHS]
    assert reloaded.seen_inputs["input_ids"].shape == (120, 12)


def _forge_learner_json(folder: Path, **changes: str) -> None:
    """Edits learner.json and updates its manifest entry (a consistent forgery: checksums match)."""
    path = folder / "learner.json"
    learner = json.loads(path.read_text())
    learner.update(changes)
    path.write_text(json.dumps(learner))
    manifest = json.loads((folder / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["files"]["learner.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_input_structure_that_does_not_match_the_chunks_is_refused(tmp_path: Path) -> None:
    _, s1 = _run(tmp_path, 2)
    _forge_learner_json(s1, input_structure=json.dumps({"dict": [["input_ids", "tensor"]]}))
    with pytest.raises(StateError, match=r"chunk_000000.safetensors: a data chunk holds exactly the tensors"):
        _updater(s1, None)
    _forge_learner_json(s1, input_structure=json.dumps({"set": []}))
    with pytest.raises(StateError, match=r"learner.json: input_structure: nested structure: unknown node"):
        _updater(s1, None)


def test_other_pad_values_than_the_chunks_were_padded_with_are_refused(tmp_path: Path) -> None:
    (s0,) = _run(tmp_path, 1)
    with pytest.raises(StateError, match=r"learner.json: the chunks were padded with pad_values \{\"input_ids\": 7\}"):
        _updater(s0, None, pad_values={"input_ids": 0})


def test_new_inputs_of_another_structure_cannot_join_the_chunks(tmp_path: Path) -> None:
    (s0,) = _run(tmp_path, 1)
    updater = _updater(s0, tmp_path / "s1")

    def tuple_collate(items: list[dict]) -> tuple[tuple[Tensor, Tensor], Tensor]:
        batch = pad_collate(items)
        return (batch["input_ids"], batch["attention_mask"]), batch["labels"]

    with pytest.raises(ValueError, match=r"inputs with leaves \['0', '1'\] cannot join"):
        updater.update(Sequences(1), train_dataset_collate_fn=tuple_collate)
    assert len(updater.learner.chunks) == 1 and not (tmp_path / "s1").exists()


def test_map_chunk_rebuilds_tuple_inputs_from_their_leaves(tmp_path: Path) -> None:
    x, aux, y = torch.rand(4, 3), torch.rand(4, 2, dtype=torch.float64), torch.arange(4)
    manifest = {"retain_version": "0", "method": "M", "model": {"class": "C", "hyperparameters": {}, "task_ids": []},
                "method_options": {}, "options": {}, "updates_done": 1, "task_ids_seen": []}  # fmt: skip
    write_state(tmp_path / "a", manifest, {}, {chunk_name(0): {"inputs.0": x, "inputs.1": aux, "targets": y}})
    source = StateFolder(tmp_path / "a").mapped_file(chunk_name(0))
    inputs, targets = map_chunk(source, {"tuple": ["tensor", "tensor"]})
    assert isinstance(inputs, tuple) and torch.equal(inputs[0], x) and torch.equal(inputs[1], aux)
    assert torch.equal(targets, y)
    with pytest.raises(StateError, match=r"a data chunk holds exactly the tensors \['inputs', 'targets'\]"):
        map_chunk(source)


def test_map_chunk_keeps_the_dtype_of_a_leaf_with_no_elements(tmp_path: Path) -> None:
    """A leaf of zero width (``(N, 0)``, e.g. an empty feature of every item) maps to an empty tensor of its
    stored dtype and shape, not to a float32 stand-in."""
    x, empty, y = torch.rand(4, 3), torch.zeros(4, 0, dtype=torch.long), torch.arange(4)
    manifest = {"retain_version": "0", "method": "M", "model": {"class": "C", "hyperparameters": {}, "task_ids": []},
                "method_options": {}, "options": {}, "updates_done": 1, "task_ids_seen": []}  # fmt: skip
    write_state(tmp_path / "a", manifest, {}, {chunk_name(0): {"inputs.x": x, "inputs.ids": empty, "targets": y}})
    source = StateFolder(tmp_path / "a").mapped_file(chunk_name(0))
    inputs, _ = map_chunk(source, nested.structure({"x": x, "ids": empty}))
    assert (inputs["ids"].dtype, tuple(inputs["ids"].shape)) == (torch.long, (4, 0))
    assert torch.equal(inputs["x"], x)


def test_batches_over_several_chunks_reuse_one_gather_buffer_per_leaf_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU every window of batches is gathered into the buffers of the previous window (when they
    fit): one allocation per leaf for an epoch, not one per window; the batches are copies out of it."""
    chunks = [({"x": torch.arange(12.0 * k, 12.0 * (k + 1)).view(6, 2)}, torch.arange(6)) for k in range(3)]
    dataset = ChunkedDataset(chunks)
    monkeypatch.setattr(ChunkedBatchSource, "WINDOW_BYTES", 4 * dataset.item_bytes)  # windows of 2 batches of 2
    buffers: list[int] = []
    real = dataset.gather_grouped

    def spy(index: Tensor, out: dict | None = None) -> tuple[dict, Tensor | None]:
        grouped, slot = real(index, out)
        buffers.append(grouped["x"].data_ptr())
        return grouped, slot

    monkeypatch.setattr(dataset, "gather_grouped", spy)
    generator = torch.Generator().manual_seed(0)
    source = ChunkedBatchSource(dataset, 2, torch.device("cpu"), shuffle=True, generator=generator)
    batches = [x["x"] for x, _ in source]
    assert len(buffers) == 18 // 4 + 1 and len(set(buffers[:-1])) == 1, "full windows share one buffer"
    rows = torch.cat(batches)
    assert sorted(rows[:, 0].tolist()) == [2.0 * i for i in range(18)], "every item once, intact"
