"""Validation on the val data of every update so far (``validation_data='all'``, the spec's
behaviour): each update's val data is a chunk of the state folder, later updates validate (and
early-stop) on the union, each chunk through its own task's head; ``'current'`` keeps nothing."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from retain import (
    ContinualModel,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    JointModelUpdater,
    MultiLayerPerceptron,
    RepeatedDistillationModelUpdater,
    StateError,
    TrainingOptions,
)
from retain.state import StateFolder
from retain.val_history import val_chunk_name

SGD = functools.partial(torch.optim.SGD, lr=0.1)
OPTIONS: dict[str, Any] = {"batch_size": 8, "max_epochs": 1, "seed": 3, "accelerator": "cpu"}
REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def double(x: Tensor) -> Tensor:
    """A test transform that changes the result: stored chunks must be validated through it too."""
    return x * 2.0


def data(k: int, n: int = 24, seed: int = 100) -> TensorDataset:
    """Update ``k``'s training items: 8 features, classes 2k and 2k + 1 (seeded)."""
    g = torch.Generator().manual_seed(seed + k)
    return TensorDataset(torch.randn(n, 8, generator=g), 2 * k + torch.randint(0, 2, (n,), generator=g))


def val(k: int) -> TensorDataset:
    """Update ``k``'s validation items (other draws of the same classes)."""
    return data(k, 16, seed=500)


def model() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(8, 6, [16])


def er(state_in: Path | None, state_out: Path | None, **kw: Any) -> ExperienceReplayModelUpdater:
    return ExperienceReplayModelUpdater(
        model(), optimizer=SGD, memory_size=10, input_state_folder=state_in, output_state_folder=state_out,
        **(OPTIONS | kw),
    )  # fmt: skip


@torch.no_grad()
def metrics_on(
    net: nn.Module, parts: list[tuple[TensorDataset, str | None]], transform: Any = None
) -> dict[str, float]:
    """val_loss (mean cross-entropy over all items) and val_accuracy of ``net`` on the union of
    ``parts`` (each through its task's head), computed by hand."""
    net.eval()
    losses, hits = [], []
    for dataset, task_id in parts:
        x, y = dataset.tensors
        logits = net(transform(x) if transform else x, task_id)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
        hits.append(logits.argmax(1) == y)
    return {"val_loss": float(torch.cat(losses).mean()), "val_accuracy": float(torch.cat(hits).float().mean())}


def last_metrics(updater: Any) -> dict[str, float]:
    entry = updater.last_fit.history[-1]
    return {k: entry[k] for k in ("val_loss", "val_accuracy")}


def val_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("val_chunk_"))


# ------------------------------------------------------------------------------------------ the option
def test_the_option_is_in_every_signature_with_its_doc_and_refuses_other_values() -> None:
    for cls in (ExperienceReplayModelUpdater, FineTuningModelUpdater, JointModelUpdater,
                RepeatedDistillationModelUpdater):  # fmt: skip
        parameter = inspect.signature(cls).parameters["validation_data"]
        assert parameter.default == "all"
        assert "every earlier update" in (cls.__init__.__doc__ or "")
    with pytest.raises(ValueError, match=r"validation_data='some' is not supported; choose one of 'all', 'current'"):
        TrainingOptions(validation_data="some")


# ------------------------------------------------------------------------------------------ the union
def test_second_update_validates_on_the_val_data_of_both_updates(tmp_path: Path) -> None:
    first = er(None, tmp_path / "s1", test_transform=double)
    first.update(data(0), val(0))
    assert val_files(tmp_path / "s1") == [val_chunk_name(0)]
    second = er(tmp_path / "s1", tmp_path / "s2", test_transform=double)
    served = second.update(data(1), val(1))
    assert val_files(tmp_path / "s2") == [val_chunk_name(0), val_chunk_name(1)]
    union = metrics_on(served, [(val(0), None), (val(1), None)], double)
    current_only = metrics_on(served, [(val(1), None)], double)
    assert last_metrics(second) == pytest.approx(union, abs=1e-6)
    assert union["val_loss"] != pytest.approx(current_only["val_loss"], abs=1e-4)  # the union is what was measured
    # the stored chunk is the same file in both states (hard link), not a rewrite
    assert os.stat(tmp_path / "s1" / val_chunk_name(0)).st_ino == os.stat(tmp_path / "s2" / val_chunk_name(0)).st_ino


def test_each_stored_chunk_is_validated_through_its_own_task_head(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0), task_id="t0")
    second = er(tmp_path / "s1", None)
    served = second.update(data(1), val(1), task_id="t1")
    assert StateFolder(tmp_path / "s1").json("learner.json")["val_task_ids"] == ["t0"]
    by_head = metrics_on(served, [(val(0), "t0"), (val(1), "t1")])
    assert last_metrics(second) == pytest.approx(by_head, abs=1e-6)
    assert by_head["val_loss"] != pytest.approx(metrics_on(served, [(val(0), "t1"), (val(1), "t1")])["val_loss"])


def test_an_update_without_val_dataset_monitors_and_early_stops_on_the_stored_val_data(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    frozen = functools.partial(torch.optim.SGD, lr=0.0)  # the metric cannot improve: stops after `patience` epochs
    second = ExperienceReplayModelUpdater(
        model(), optimizer=frozen, memory_size=10, input_state_folder=tmp_path / "s1",
        output_state_folder=tmp_path / "s2", **(OPTIONS | {"max_epochs": 10}), metric="val_loss",
        early_stopping_enabled=True, patience=2,
    )  # fmt: skip
    served = second.update(data(1))  # no val_dataset: the stored one of update 0 is monitored
    assert second.last_fit.stopped_early and second.last_fit.epochs == 3
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(0), None)]), abs=1e-6)
    assert val_files(tmp_path / "s2") == [val_chunk_name(0)]  # kept for the next updates


def test_no_val_data_at_all_is_refused_before_training(tmp_path: Path) -> None:
    updater = er(None, tmp_path / "s1", metric="val_loss")
    with pytest.raises(ValueError, match=r"metric='val_loss' monitors validation metrics, but this update has no "
                                         r"val_dataset and no earlier update's val data is stored: pass one"):
        updater.update(data(0))
    assert updater.learner.global_step == 0 and not (tmp_path / "s1").exists()
    er(None, tmp_path / "s1").update(data(0))  # an update without val data stores none
    with pytest.raises(ValueError, match=r"early_stopping_enabled monitors .* no earlier update's val data"):
        er(tmp_path / "s1", None, metric="val_loss", early_stopping_enabled=True).update(data(1))


# ------------------------------------------------------------------------------------------ 'current'
def test_current_keeps_nothing_and_validates_on_this_update_only(tmp_path: Path) -> None:
    er(None, tmp_path / "s1", validation_data="current").update(data(0), val(0))
    assert val_files(tmp_path / "s1") == []
    assert StateFolder(tmp_path / "s1").json("learner.json")["val_chunks"] == []
    second = er(tmp_path / "s1", tmp_path / "s2", validation_data="current")
    served = second.update(data(1), val(1))
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(1), None)]), abs=1e-6)
    assert val_files(tmp_path / "s2") == []
    with pytest.raises(ValueError, match=r"metric='val_loss' monitors validation metrics, but this update has no "
                                         r"val_dataset: pass one"):
        er(tmp_path / "s2", None, validation_data="current", metric="val_loss").update(data(2))


def test_current_on_a_state_with_val_chunks_drops_them(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    second = er(tmp_path / "s1", tmp_path / "s2", validation_data="current")
    served = second.update(data(1), val(1))
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(1), None)]), abs=1e-6)
    assert val_files(tmp_path / "s2") == []


# ------------------------------------------------------------------------------------------ every updater
def test_joint_and_rd_validate_on_the_union_too(tmp_path: Path) -> None:
    joint = functools.partial(JointModelUpdater, optimizer=SGD, **OPTIONS)
    joint(model(), output_state_folder=tmp_path / "j1").update(data(0), val(0))
    second = joint(model(), input_state_folder=tmp_path / "j1", output_state_folder=tmp_path / "j2")
    served = second.update(data(1), val(1))
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(0), None), (val(1), None)]), abs=1e-6)
    names = sorted(p.name for p in (tmp_path / "j2").iterdir() if "chunk_" in p.name)
    assert names == ["chunk_000000.safetensors", "chunk_000001.safetensors", val_chunk_name(0), val_chunk_name(1)]

    rd = functools.partial(RepeatedDistillationModelUpdater, optimizer=SGD, memory_size=20, **OPTIONS)
    rd(model(), output_state_folder=tmp_path / "r1").update(data(0), val(0))
    second = rd(model(), input_state_folder=tmp_path / "r1", metric="val_accuracy", mode="max")
    served = second.update(data(1))  # no val_dataset: not refused before the expert trains, stored data is monitored
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(0), None)]), abs=1e-6)


# ------------------------------------------------------------------------------------------ state format
_SECOND_UPDATE = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    from torch.utils.data import TensorDataset
    from retain import ExperienceReplayModelUpdater, MultiLayerPerceptron
    torch.set_num_threads(1)
    def data(k, n=24, seed=100):
        g = torch.Generator().manual_seed(seed + k)
        return TensorDataset(torch.randn(n, 8, generator=g), 2 * k + torch.randint(0, 2, (n,), generator=g))
    torch.manual_seed(0)
    updater = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(8, 6, [16]), optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=10,
        input_state_folder=sys.argv[1], output_state_folder=sys.argv[2], batch_size=8, max_epochs=1, seed=3,
        accelerator="cpu",
    )
    updater.update(data(1), data(1, 16, seed=500))
    print(json.dumps(updater.last_fit.history[-1]))
    """
)


def test_a_new_process_continues_with_the_stored_val_data(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    env = dict(os.environ, PYTHONPATH=str(REPO_SRC), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _SECOND_UPDATE, str(tmp_path / "s1"), str(tmp_path / "s2")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    served = er(tmp_path / "s2", None).model  # the second state's weights, read back here
    expected = metrics_on(served, [(val(0), None), (val(1), None)])
    assert {k: measured[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    # and the third update, in this process, links both chunks and adds its own
    er(tmp_path / "s2", tmp_path / "s3").update(data(2), val(2))
    assert val_files(tmp_path / "s3") == [val_chunk_name(0), val_chunk_name(1), val_chunk_name(2)]


class DictMLP(ContinualModel):
    """A model on dict inputs ``{"x": (B, 8), "scale": (B, 1)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features, self.num_outputs = 16, 6
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def get_features(self, x: dict[str, Tensor]) -> Tensor:
        return self.body(x["x"] * x["scale"])


class DictData(Dataset):
    """Dict items of update ``k`` (not tensor-backed: read through a DataLoader)."""

    def __init__(self, k: int, seed: int = 100) -> None:
        base = data(k, seed=seed)
        self.x, self.y = base.tensors
        self.scale = torch.linspace(0.5, 1.5, len(self.y))[:, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"x": self.x[i], "scale": self.scale[i]}, self.y[i]


def test_nested_val_data_is_stored_and_validated(tmp_path: Path) -> None:
    def updater(state_in: Path | None, state_out: Path | None) -> FineTuningModelUpdater:
        torch.manual_seed(0)
        return FineTuningModelUpdater(DictMLP(), optimizer=SGD, input_state_folder=state_in,
                                      output_state_folder=state_out, **OPTIONS)  # fmt: skip

    updater(None, tmp_path / "s1").update(DictData(0), DictData(0, 500))
    learner_json = StateFolder(tmp_path / "s1").json("learner.json")
    assert json.loads(learner_json["val_input_structures"][0]) == {"dict": [["x", "tensor"], ["scale", "tensor"]]}
    second = updater(tmp_path / "s1", None)
    served = second.update(DictData(1), DictData(1, 500))
    with torch.no_grad():
        served.eval()
        parts = [DictData(0, 500), DictData(1, 500)]
        logits = torch.cat([served({"x": p.x, "scale": p.scale}) for p in parts])
        y = torch.cat([p.y for p in parts])
    expected = {"val_loss": float(nn.functional.cross_entropy(logits, y)),
                "val_accuracy": float((logits.argmax(1) == y).float().mean())}  # fmt: skip
    assert last_metrics(second) == pytest.approx(expected, abs=1e-6)


def test_an_altered_or_missing_val_chunk_is_refused(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    chunk = tmp_path / "s1" / val_chunk_name(0)
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    os.unlink(chunk)  # a new inode: the hard-linked copies elsewhere are not touched
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StateError, match=r"val_chunk_000000\.safetensors: checksum mismatch"):
        er(tmp_path / "s1", None)
    chunk.unlink()
    with pytest.raises(StateError, match=r"files listed in the manifest are missing: \['val_chunk_000000"):
        er(tmp_path / "s1", None)


def _rewrite(folder: Path, name: str, content: Any) -> None:
    """Replaces a JSON file of a state folder and its manifest entry (as an older retain wrote it)."""
    data_bytes = json.dumps(content).encode()
    (folder / name).write_bytes(data_bytes)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data_bytes).hexdigest(), "bytes": len(data_bytes)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_state_written_before_val_chunks_loads_without_history(tmp_path: Path) -> None:
    er(None, tmp_path / "s1", validation_data="current").update(data(0), val(0))
    learner_json = StateFolder(tmp_path / "s1").json("learner.json")
    old = {k: v for k, v in learner_json.items() if not k.startswith("val_")}
    _rewrite(tmp_path / "s1", "learner.json", old)
    second = er(tmp_path / "s1", tmp_path / "s2")
    served = second.update(data(1), val(1))
    assert last_metrics(second) == pytest.approx(metrics_on(served, [(val(1), None)]), abs=1e-6)
    assert val_files(tmp_path / "s2") == [val_chunk_name(1)]  # the history starts here


def test_learner_json_that_lists_other_val_chunks_is_refused(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    learner_json = StateFolder(tmp_path / "s1").json("learner.json")
    _rewrite(tmp_path / "s1", "learner.json", learner_json | {"val_chunks": [val_chunk_name(5)]})
    with pytest.raises(StateError, match=r"learner\.json: val_chunks must name val_chunk_<update>\.safetensors"):
        er(tmp_path / "s1", None)
    _rewrite(tmp_path / "s1", "learner.json", learner_json | {"val_task_ids": ["elsewhere"]})
    with pytest.raises(StateError, match=r"learner\.json: val_task_ids \['elsewhere'\] are not among the task ids"):
        er(tmp_path / "s1", None)
    _rewrite(tmp_path / "s1", "learner.json", learner_json | {"val_task_ids": []})
    with pytest.raises(StateError, match=r"val_chunks, val_task_ids, val_input_structures must have one entry per"):
        er(tmp_path / "s1", None)
    _rewrite(tmp_path / "s1", "learner.json", learner_json | {"val_input_structures": ['{"dict": [["x", "tensor"]]}']})
    with pytest.raises(StateError, match=r"val_chunk_000000\.safetensors: a data chunk holds exactly the tensors"):
        er(tmp_path / "s1", None)
    _rewrite(tmp_path / "s1", "learner.json", learner_json | {"val_chunks": [], "val_task_ids": [],
                                                              "val_input_structures": []})  # fmt: skip
    with pytest.raises(StateError, match=r"manifest\.json: the validation chunk files \['val_chunk_000000"):
        er(tmp_path / "s1", None)


def test_a_resumed_update_keeps_its_val_data(tmp_path: Path) -> None:
    er(None, tmp_path / "s1").update(data(0), val(0))
    kw = {"max_epochs": 3, "checkpoint_every_n_epochs": 1}
    whole = er(tmp_path / "s1", tmp_path / "whole", **kw)
    whole.update(data(1), val(1))

    class StopError(Exception):
        pass

    interrupted = er(tmp_path / "s1", tmp_path / "resumed", **kw)
    original = interrupted.learner.validation_step
    calls = {"n": 0}

    def stop_in_epoch_two(batch: Any, batch_idx: int) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 validated (2 chunks, one batch each) and checkpointed; stop in epoch 2
            raise StopError
        original(batch, batch_idx)

    interrupted.learner.validation_step = stop_in_epoch_two  # type: ignore[method-assign]
    with pytest.raises(StopError):
        interrupted.update(data(1), val(1))
    resumed = er(tmp_path / "s1", tmp_path / "resumed", **kw)
    resumed.update(data(1), val(1))
    assert resumed.resumed_from_epoch == 1
    assert resumed.last_fit.history == whole.last_fit.history
    assert val_files(tmp_path / "resumed") == [val_chunk_name(0), val_chunk_name(1)]


# ------------------------------------------------------------------------------------------ command line
def test_the_option_through_retain_update_and_the_benchmark_flag(tmp_path: Path) -> None:
    from retain.cli import main, parse_command

    config = tmp_path / "config.py"
    config.write_text(textwrap.dedent(
        """
        import torch
        from torch.utils.data import TensorDataset
        from retain import MultiLayerPerceptron
        METHOD = "finetune"
        UPDATER_OPTIONS = {"max_epochs": 1, "batch_size": 8, "accelerator": "cpu", "progress_bar": False,
                           "validation_data": VALIDATION}
        def data(k):
            g = torch.Generator().manual_seed(100 + k)
            return TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, 2, (24,), generator=g))
        def model_fn():
            return MultiLayerPerceptron(8, 6, [16])
        def train_dataset_fn():
            return data(0)
        def val_dataset_fn():
            return data(1)
        """
    ))  # fmt: skip
    for validation, expected in (("all", [val_chunk_name(0)]), ("current", [])):
        text = config.read_text().replace("VALIDATION", repr(validation))
        (tmp_path / f"{validation}.py").write_text(text)
        out = tmp_path / f"state_{validation}"
        assert main(["update", "--config", str(tmp_path / f"{validation}.py"), "--output-state", str(out)]) == 0
        assert val_files(out) == expected
    assert parse_command(["benchmark", "--validation-data", "current"]).validation_data == "current"
