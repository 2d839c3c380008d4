"""JointLearner's own checks and options: the class mask over every chunk, a DDP rank's shard, the
data kept so far, the pad values, and the refusals of an input state whose learner.json, manifest
or chunk files do not agree (a chunk of another dtype, of other targets, or of classes the model
does not have), each naming the file."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.methods import JointModelUpdater
from retain.state import StateError

ITEMS = 12


def chunk(seed: int, classes: tuple[int, ...] = (0, 1, 2), dtype: torch.dtype = torch.int64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(classes).repeat(ITEMS // len(classes) + 1)[:ITEMS].to(dtype)
    return TensorDataset(torch.randn(ITEMS, 4, generator=g), targets)


def joint(input_state: Path | None = None, output_state: Path | None = None, outputs: int = 3,
          **options: Any) -> JointModelUpdater:  # fmt: skip
    torch.manual_seed(0)
    options = {"batch_size": 4, "max_epochs": 1, "accelerator": "cpu", **options}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    return JointModelUpdater(MultiLayerPerceptron(4, outputs, [8]), optimizer=sgd, input_state_folder=input_state,
                             output_state_folder=output_state, **options)  # fmt: skip


def two_updates(folder: Path, second: TensorDataset, outputs: int = 3) -> Path:
    joint(None, folder / "v0", outputs).update(chunk(0, tuple(range(min(outputs, 3)))))
    joint(folder / "v0", folder / "v1", outputs).update(second)
    return folder / "v1"


def trained_inputs(model: torch.nn.Module) -> list[Tensor]:
    """The inputs of every train-mode forward of ``model`` from now on."""
    seen: list[Tensor] = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()) if m.training else None)
    return seen


def transplant(target: Path, source: Path, name: str) -> None:
    """Puts ``source``'s file ``name`` (and its manifest entry) into ``target``: the checksums agree,
    so only the learner's own checks can refuse it."""
    shutil.copyfile(source / name, target / name)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"][name] = json.loads((source / "manifest.json").read_text())["files"][name]
    (target / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------ options


def test_joint_masks_the_classes_of_every_chunk_not_only_the_new_one(tmp_path: Path) -> None:
    joint(None, tmp_path / "v0", mask_unused_classes=True).update(chunk(0, (0,)))
    updater = joint(tmp_path / "v0", tmp_path / "v1", mask_unused_classes=True)
    updater.update(chunk(1, (1,)))
    assert updater.learner.masked_classes == [0, 1]
    given = joint(tmp_path / "v0", tmp_path / "v2", mask_unused_classes=True, update_classes=[0, 1, 2])
    given.update(chunk(1, (1,)))
    assert given.learner.masked_classes == [0, 1, 2], "update_classes, when given, is the mask"
    off = joint(tmp_path / "v0", tmp_path / "v3")
    off.update(chunk(1, (1,)))
    assert off.learner.masked_classes is None


def test_joint_keeps_the_pad_values_option() -> None:
    assert joint(pad_values={"tokens": 5.0}).learner.pad_values == {"tokens": 5.0}
    assert joint().learner.pad_values == {}


def test_a_joint_train_shard_is_the_given_items_of_all_chunks_shuffled_in_batches_of_its_size(tmp_path: Path) -> None:
    joint(None, tmp_path / "v0").update(chunk(0))
    learner = joint(tmp_path / "v0").learner
    learner.on_model_update_start(chunk(1), None)
    every = torch.cat([chunk(0).tensors[0], chunk(1).tensors[0]])
    indices = torch.tensor([0, 3, 5, 13, 17, 20, 23])
    learner.use_train_shard(indices, 3)
    epochs = [list(learner.train_dataloader()) for _ in range(2)]
    for batches in epochs:
        assert [len(y) for _, y in batches] == [3, 3, 1]
        got = torch.cat([x for x, _ in batches])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, every[indices].tolist()))
    orders = [torch.cat([x for x, _ in batches]) for batches in epochs]
    assert not torch.equal(orders[0], every[indices]), "the shard is read in index order"
    assert not torch.equal(orders[0], orders[1]), "every epoch reads the shard in the same order"


def test_joint_shows_every_item_kept_so_far(tmp_path: Path) -> None:
    fresh = joint().learner
    assert fresh.seen_inputs is None and fresh.seen_targets is None and fresh.input_structure == ""
    joint(None, tmp_path / "v0").update(chunk(0))
    updater = joint(tmp_path / "v0")
    updater.update(chunk(1))
    learner = updater.learner
    assert torch.equal(learner.seen_inputs, torch.cat([chunk(0).tensors[0], chunk(1).tensors[0]]))
    assert torch.equal(learner.seen_targets, torch.cat([chunk(0).tensors[1], chunk(1).tensors[1]]))
    assert json.loads(learner.input_structure) == "tensor"
    assert learner.chunk_names == ["chunk_000000.safetensors", "chunk_000001.safetensors"]


def test_a_joint_state_with_val_chunks_loads_and_continues(tmp_path: Path) -> None:
    """Val data is kept as val_chunk_ files beside the data chunks: they are not data chunks."""
    joint(None, tmp_path / "v0").update(chunk(0), chunk(5))
    updater = joint(tmp_path / "v0", tmp_path / "v1")
    assert len(updater.learner.chunks) == 1
    updater.update(chunk(1), chunk(6))
    assert updater.last_fit is not None and "val_accuracy" in updater.last_fit.history[-1]


# ------------------------------------------------------------------ learner.json and the manifest


def fake_state(files: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(path=Path("state"), manifest={"files": files})


def test_a_joint_state_without_chunks_must_record_no_structure_or_pad_values() -> None:
    learner = joint().learner
    learner.loaded_chunk_names, learner.loaded_structure, learner.loaded_pad_values = [], '"tensor"', ""
    with pytest.raises(StateError, match=r"learner\.json: input_structure and pad_values must be empty without chunks"):
        learner.attach_chunks(fake_state({}))  # type: ignore[arg-type]
    learner.loaded_structure, learner.loaded_pad_values = "", "{}"
    with pytest.raises(StateError, match="must be empty without chunks"):
        learner.attach_chunks(fake_state({}))  # type: ignore[arg-type]
    learner.loaded_pad_values = ""
    learner.attach_chunks(fake_state({}))  # type: ignore[arg-type]
    assert learner.chunks == []


def test_a_manifest_listing_other_chunks_than_learner_json_is_refused() -> None:
    learner = joint().learner
    learner.updates_done = 1
    learner.loaded_chunk_names = ["chunk_000000.safetensors"]
    files = {"chunk_000000.safetensors": {}, "chunk_000001.safetensors": {}, "learner.json": {}}
    with pytest.raises(StateError, match=r"manifest.json: the data chunk files .*chunk_000001.* differ from those of"):
        learner.attach_chunks(fake_state(files))  # type: ignore[arg-type]


# ------------------------------------------------------------------ chunks that do not agree


def test_a_chunk_of_another_input_dtype_is_refused_naming_the_file(tmp_path: Path) -> None:
    """The float64 chunk comes from a precision='64' state (a float32 model refuses float64 data)."""
    target = two_updates(tmp_path / "a", chunk(1))
    wide = [TensorDataset(chunk(s).tensors[0].double(), chunk(s).tensors[1]) for s in (0, 1)]
    joint(None, tmp_path / "b" / "v0", precision="64").update(wide[0])
    joint(tmp_path / "b" / "v0", tmp_path / "b" / "v1", precision="64").update(wide[1])
    transplant(target, tmp_path / "b" / "v1", "chunk_000001.safetensors")
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: inputs torch.float64 \(4,\) differs from the "
                                         r"torch.float32 \(4,\) of chunk_000000.safetensors"):  # fmt: skip
        joint(target)


def test_a_chunk_of_another_target_dtype_is_refused_naming_the_file(tmp_path: Path) -> None:
    target = two_updates(tmp_path / "a", chunk(1))
    joint(None, tmp_path / "b" / "v0").update(chunk(0, dtype=torch.uint8))
    joint(tmp_path / "b" / "v0", tmp_path / "b" / "v1").update(chunk(1, dtype=torch.uint8))
    transplant(target, tmp_path / "b" / "v1", "chunk_000001.safetensors")
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: torch.uint8 targets differ from the torch.int64"):
        joint(target)


@pytest.mark.parametrize("label", [3, 4], ids=["the first class too many", "a class further out"])
def test_a_chunk_with_a_class_the_model_does_not_have_is_refused(label: int, tmp_path: Path) -> None:
    target = two_updates(tmp_path / "a", chunk(1))
    source = two_updates(tmp_path / "b", chunk(1, (0, label)), outputs=label + 1)
    transplant(target, source, "chunk_000001.safetensors")
    with pytest.raises(StateError, match=r"chunk_000001.safetensors: targets must lie in \[0, 2\]"):
        joint(target)


def test_the_chunks_of_a_joint_state_load_as_written(tmp_path: Path) -> None:
    target = two_updates(tmp_path / "a", chunk(1, (2, 0)))
    learner = joint(target).learner
    loaded: list[Tensor] = [y for _, y in learner.chunks]
    assert torch.equal(loaded[0], chunk(0).tensors[1]) and torch.equal(loaded[1], chunk(1, (2, 0)).tensors[1])


def test_joint_refuses_inputs_that_cannot_join_and_casts_targets_to_the_first_chunks(tmp_path: Path) -> None:
    joint(None, tmp_path / "v0").update(chunk(0))
    wide = TensorDataset(chunk(1).tensors[0].double(), chunk(1).tensors[1])
    with pytest.raises(ValueError, match=r"raw inputs of per-item shape \(4,\) and dtype torch.float64 cannot join"):
        joint(tmp_path / "v0").update(wide)
    updater = joint(tmp_path / "v0", tmp_path / "v1")
    updater.update(chunk(1, dtype=torch.uint8))
    assert [y.dtype for _, y in updater.learner.chunks] == [torch.int64, torch.int64]


def test_joint_trains_on_all_chunks_in_an_order_drawn_from_its_seed(tmp_path: Path) -> None:
    joint(None, tmp_path / "v0").update(chunk(0))
    orders = []
    for outer in (1, 2):
        updater = joint(tmp_path / "v0", batch_size=24)
        seen = trained_inputs(updater.model)
        torch.manual_seed(outer)  # the caller's global random state does not change the order
        updater.update(chunk(1))
        (batch,) = seen
        orders.append(batch)
    every = torch.cat([chunk(0).tensors[0], chunk(1).tensors[0]])
    assert torch.equal(orders[0], orders[1])
    assert sorted(map(tuple, orders[0].tolist())) == sorted(map(tuple, every.tolist()))
    assert not torch.equal(orders[0], every), "the items were read in chunk order"


@pytest.mark.parametrize(
    ("names", "updates_done"),
    [(["chunk_000000.safetensors"], 2), (["chunk_000001.safetensors"], 1),
     (["chunk_000000.safetensors", "chunk_000000.safetensors"], 2)],
    ids=["one chunk for two updates", "not numbered from 0", "a name twice"],
)  # fmt: skip
def test_learner_json_must_list_one_chunk_per_update_done_in_order(names: list[str], updates_done: int) -> None:
    learner = joint().learner
    learner.updates_done, learner.loaded_chunk_names = updates_done, names
    files = {name: {} for name in names}
    with pytest.raises(StateError, match=rf"chunks must be chunk_000000.safetensors \.\.\. one per update done "
                                         rf"\({updates_done}\)"):  # fmt: skip
        learner.attach_chunks(fake_state(files))  # type: ignore[arg-type]


def test_joint_keeps_the_items_as_its_train_collate_function_makes_them(map_dataset: type, tmp_path: Path) -> None:
    def shifted(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return torch.stack([x for x, _ in items]) + 1.0, torch.stack([y for _, y in items])

    data = chunk(0)
    updater = joint(None, tmp_path / "v0")
    updater.update(map_dataset(*data.tensors), train_dataset_collate_fn=shifted)
    ((inputs, targets),) = updater.learner.chunks
    assert torch.equal(inputs, data.tensors[0] + 1.0) and torch.equal(targets, data.tensors[1])


def test_joint_hashes_input_chunks_in_the_background_only_without_in_progress_checkpoints(tmp_path: Path) -> None:
    assert joint()._defer_mapped_verification() is True
    assert joint(checkpoint_every_n_epochs=1, output_state=tmp_path / "out")._defer_mapped_verification() is False
    sequential = joint()
    sequential.verify_chunks_in_background = False
    assert sequential._defer_mapped_verification() is False


def test_joint_pads_the_reading_batches_of_one_update_with_the_pad_values(tmp_path: Path) -> None:
    """The new data is read in batches of 512 items, each padded by the collate function to its own
    longest item; joining them pads the shorter batches with ``pad_values`` (PAD), not with 0."""
    from padded_sequences import PAD, MaskedMean, pad_collate

    g = torch.Generator().manual_seed(0)
    lengths = [9] + [3] * 599  # only the first batch of 512 reaches length 9
    items = [{"input_ids": torch.randint(8, 40, (n,), generator=g), "labels": i % 2} for i, n in enumerate(lengths)]
    torch.manual_seed(0)
    updater = JointModelUpdater(MaskedMean(2), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=600,
                                max_epochs=1, accelerator="cpu", pad_values={"input_ids": PAD})  # fmt: skip
    updater.update(items, train_dataset_collate_fn=pad_collate)
    ((inputs, _),) = updater.learner.chunks
    ids = inputs["input_ids"]
    assert ids.shape == (600, 9)
    assert bool((ids[512:, 3:] == PAD).all()), "the second batch was not padded with the pad value"
    assert bool((inputs["attention_mask"][512:, 3:] == 0).all())


def test_learner_json_must_record_a_valid_structure_and_the_updates_pad_values() -> None:
    learner = joint().learner
    learner.updates_done, learner.loaded_chunk_names = 1, ["chunk_000000.safetensors"]
    state = fake_state({"chunk_000000.safetensors": {}})
    learner.loaded_structure, learner.loaded_pad_values = '"bogus"', "{}"
    with pytest.raises(StateError, match=r"learner\.json: input_structure: nested structure: unknown node 'bogus'"):
        learner.attach_chunks(state)  # type: ignore[arg-type]
    learner.loaded_structure, learner.loaded_pad_values = '"tensor"', '{"tokens": 1.0}'
    padded = r"the chunks were padded with pad_values \{\"tokens\": 1\.0\}, this update pads with \{\}"
    with pytest.raises(StateError, match=padded):
        learner.attach_chunks(state)  # type: ignore[arg-type]


def test_a_second_state_of_the_same_update_hard_links_its_data_and_val_chunks(tmp_path: Path) -> None:
    """Once written, the chunk files (data and val) are recorded, so a later state of the same
    updater links them instead of writing them again."""
    updater = joint(None, tmp_path / "v0")
    updater.update(chunk(0), chunk(5))
    updater.save_state(tmp_path / "copy")
    names = sorted(p.name for p in (tmp_path / "v0").iterdir() if p.name.startswith(("chunk_", "val_chunk_")))
    assert any(n.startswith("val_chunk_") for n in names) and "chunk_000000.safetensors" in names
    for name in names:
        assert (tmp_path / "copy" / name).stat().st_ino == (tmp_path / "v0" / name).stat().st_ino, name
