"""RepeatedDistillationModelUpdater: fresh experts, consolidation from the memory only, state folders."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

import retain.methods.repeated_distill as rd
from retain.learners.base import Learner
from retain.methods import ExperienceReplayModelUpdater
from retain.methods.repeated_distill import (
    RepeatedDistillationLearner,
    RepeatedDistillationModelUpdater,
    extract_logits,
    reinitialized_copy,
)
from retain.models import MultiLayerPerceptron
from retain.state import StateError, StateFolder

N_PER_TASK = 40
CENTRES = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0], [0, 0, 0, 3.0, 0, 0]])


def _task(classes: tuple[int, int], seed: int, n: int = N_PER_TASK) -> TensorDataset:
    """Gaussian blobs of two classes (distinct random rows, so items can be recognised)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(classes).repeat(n // 2)
    inputs = CENTRES[targets] + 0.5 * torch.randn(n, 6, generator=g)
    return TensorDataset(inputs, targets)


TASKS = [_task((0, 1), 10), _task((2, 3), 11)]


def _updater(**kw: Any) -> RepeatedDistillationModelUpdater:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(6, 4, [16])
    options: dict[str, Any] = dict(
        memory_size=10, batch_size=8, max_epochs=2, consolidation_epochs=3, consolidation_batch_size=4, seed=0
    )
    options.update(kw)
    return RepeatedDistillationModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), **options)


def _rows_in(rows: Tensor, pool: Tensor) -> Tensor:
    """For each row, its index in ``pool`` (-1 if absent)."""
    match = (rows[:, None, :] == pool[None, :, :]).all(-1)
    return torch.where(match.any(1), match.float().argmax(1), torch.full((rows.shape[0],), -1))


def _clone(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rd_expert_and_consolidated_model_start_from_fresh_seeded_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    updater = _updater()
    updater.update(TASKS[0])
    seen: list[tuple[type, Any, dict[str, Tensor]]] = []
    real_fit = rd.fit

    def spy_fit(learner: Learner, *args: Any, **kwargs: Any) -> Any:
        seen.append((type(learner), learner.model, _clone(learner.model)))
        return real_fit(learner, *args, **kwargs)

    monkeypatch.setattr(rd, "fit", spy_fit)
    before = _clone(updater.model)
    learner = updater.learner
    fresh_expert = reinitialized_copy(updater.model, learner.initialization_seed("expert"), "default_task")
    fresh_consolidated = reinitialized_copy(updater.model, learner.initialization_seed("consolidated"))
    updater.update(TASKS[1])

    (expert_cls, expert, expert_start), (cons_cls, cons_model, cons_start) = seen
    assert expert_cls is Learner and expert is not updater.model
    assert cons_cls is RepeatedDistillationLearner and cons_model is updater.model
    for name, value in expert_start.items():
        torch.testing.assert_close(value, fresh_expert.state_dict()[name], rtol=0, atol=0)
        assert not torch.equal(value, before[name]), name
    for name, value in cons_start.items():
        torch.testing.assert_close(value, fresh_consolidated.state_dict()[name], rtol=0, atol=0)
        assert not torch.equal(value, before[name]), name
        if name.endswith("weight"):  # biases start at zero under the MLP's Xavier initialisation
            assert not torch.equal(value, expert_start[name]), name
    # the expert trained (it is discarded, the served model is the consolidated one)
    assert not torch.equal(expert.state_dict()["layers.0.weight"], expert_start["layers.0.weight"])


def test_rd_consolidation_sees_only_the_memory_with_kept_old_and_expert_new_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    updater = _updater()
    updater.update(TASKS[0])
    old_inputs, _, old_meta = updater.learner.memory.raw_items()
    old_inputs, old_logits = old_inputs.clone(), old_meta["logits"].clone()
    expert_logits: list[Tensor] = []
    real_set = updater.learner.update_expert_logits
    monkeypatch.setattr(updater.learner, "update_expert_logits", lambda z: (expert_logits.append(z), real_set(z)))
    batches: list[tuple[Tensor, Tensor]] = []
    real_step = RepeatedDistillationLearner.training_step

    def spy_step(self: RepeatedDistillationLearner, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        batches.append((batch[0].clone(), batch[1].clone()))
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(RepeatedDistillationLearner, "training_step", spy_step)
    updater.update(TASKS[1])

    memory_inputs = updater.learner.memory.raw_items()[0]
    seen_inputs = torch.cat([b[0] for b in batches])
    seen_targets = torch.cat([b[1] for b in batches])
    assert len(batches) == updater.last_fit.steps == 3 * math.ceil(10 / 4)
    assert updater.last_expert_fit is not None and updater.last_expert_fit.steps == 2 * math.ceil(N_PER_TASK / 8)
    assert bool((_rows_in(seen_inputs, memory_inputs) >= 0).all()), "consolidation saw an item not in memory"
    assert seen_inputs.unique(dim=0).shape[0] == len(updater.learner.memory) == 10
    # old items: the logits stored at the end of update 1; new items: the expert's logits
    in_old = _rows_in(seen_inputs, old_inputs)
    in_new = _rows_in(seen_inputs, TASKS[1].tensors[0])
    assert bool(((in_old >= 0) ^ (in_new >= 0)).all()) and bool((in_old >= 0).any()) and bool((in_new >= 0).any())
    torch.testing.assert_close(seen_targets[in_old >= 0], old_logits[in_old[in_old >= 0]])
    torch.testing.assert_close(seen_targets[in_new >= 0], expert_logits[0][in_new[in_new >= 0]])


def test_rd_stored_logits_are_refreshed_by_the_consolidated_model() -> None:
    updater = _updater()
    served = updater.update(TASKS[0])
    memory = updater.learner.memory
    assert set(memory.metadata) == {"logits"}
    torch.testing.assert_close(memory.raw_items()[2]["logits"], extract_logits(served, memory, 16))


def test_rd_learns_both_tasks_and_validates_the_consolidated_model() -> None:
    updater = _updater(memory_size=40, max_epochs=3, consolidation_epochs=30, consolidation_batch_size=8)
    val = _task((2, 3), 12, n=20)
    model = updater.update(TASKS[0])
    model = updater.update(TASKS[1], val_dataset=val)
    history = updater.last_fit.history
    assert len(history) == 30 and all("val_accuracy" in h for h in history)
    tests = [_task((0, 1), 20), _task((2, 3), 21)]
    with torch.no_grad():
        accuracies = [float((model(t.tensors[0]).argmax(1) == t.tensors[1]).float().mean()) for t in tests]
    assert min(accuracies) > 0.85, accuracies


def test_rd_state_round_trip_continues_identically(tmp_path: Path) -> None:
    first = _updater(output_state_folder=tmp_path / "s1")
    first.update(TASKS[0])
    restored = _updater(input_state_folder=tmp_path / "s1", output_state_folder=tmp_path / "s2")
    a, b = first.learner.memory, restored.learner.memory
    assert (a.seen, len(a)) == (b.seen, len(b)) == (N_PER_TASK, 10)
    for x, y in zip(a.raw_items()[:2], b.raw_items()[:2], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a.raw_items()[2]["logits"], b.raw_items()[2]["logits"], rtol=0, atol=0)
    assert restored.learner.updates_done == 1 and restored.learner.global_step == first.learner.global_step

    first.update(TASKS[1])
    restored.update(TASKS[1])
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(a.raw_items()[2]["logits"], b.raw_items()[2]["logits"], rtol=0, atol=0)
    manifest = StateFolder(tmp_path / "s2").manifest
    assert manifest["method"] == "RepeatedDistillationModelUpdater" and manifest["updates_done"] == 2
    assert manifest["method_options"] == {"memory_size": 10, "consolidation_epochs": 3, "consolidation_batch_size": 4}


def test_rd_refuses_a_state_folder_of_another_method(tmp_path: Path) -> None:
    torch.manual_seed(0)
    er = ExperienceReplayModelUpdater(
        MultiLayerPerceptron(6, 4, [16]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        memory_size=10,
        max_epochs=1,
        output_state_folder=tmp_path / "er",
    )
    er.update(TASKS[0])
    with pytest.raises(StateError, match="ExperienceReplayModelUpdater"):
        _updater(input_state_folder=tmp_path / "er")
    _updater(output_state_folder=tmp_path / "rd").update(TASKS[0])
    with pytest.raises(StateError, match="RepeatedDistillationModelUpdater"):
        ExperienceReplayModelUpdater(
            MultiLayerPerceptron(6, 4, [16]),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
            memory_size=10,
            input_state_folder=tmp_path / "rd",
        )


def test_rd_options_defaults_and_refusals() -> None:
    model = MultiLayerPerceptron(6, 4, [16])
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    updater = RepeatedDistillationModelUpdater(model, None, sgd, 20, batch_size=16, max_epochs=4)
    assert updater.options.seed is None  # the spec's default
    assert updater.learner.consolidation_epochs == 4 and updater.learner.consolidation_batch_size == 16
    with pytest.raises(ValueError, match="memory_size"):
        RepeatedDistillationModelUpdater(model, None, sgd, 0)
    with pytest.raises(ValueError, match="consolidation_epochs"):
        RepeatedDistillationModelUpdater(model, None, sgd, 10, consolidation_epochs=0)
    with pytest.raises(TypeError, match="unknown option"):
        RepeatedDistillationModelUpdater(model, None, sgd, 10, consolidation_epoch=3)
    with pytest.raises(ValueError, match="checkpoint_every_n_epochs"):  # two loops per update: not resumable
        RepeatedDistillationModelUpdater(model, None, sgd, 10, checkpoint_every_n_epochs=1, output_state_folder="x")


def test_rd_warns_when_task_ids_change() -> None:
    updater = _updater()
    updater.update(TASKS[0], task_id="a")
    with pytest.warns(UserWarning, match="one task id"):
        updater.update(TASKS[1], task_id="b")


def test_reinitialized_copy_adds_the_task_head_and_keeps_float64_inputs_working() -> None:
    """The copy has the model's heads plus ``task_id``'s, and a ``precision='64'`` model's copy still
    takes float32 inputs (the float64 input cast comes with the copy, as for the model itself)."""
    from retain.learners.base import use_float64

    torch.manual_seed(0)
    copy = reinitialized_copy(MultiLayerPerceptron(6, 4, [16]), 5, "new")
    assert copy.task_ids == ["default_task", "new"]
    wide = use_float64(MultiLayerPerceptron(6, 4, [16]))
    copy = reinitialized_copy(wide, 5)
    assert next(copy.parameters()).dtype == torch.float64
    assert copy(torch.randn(2, 6)).dtype == torch.float64


def test_rd_initialisation_seeds_are_those_of_the_previous_release() -> None:
    """The fresh weights' seeds derive from the learner's seed and the updates done: the same seeded run
    gives the same expert and consolidated models release after release (values as written)."""
    updater = _updater(seed=0)
    assert [updater.learner.initialization_seed(r) for r in ("expert", "consolidated")] == [104729, 209458]
    updater.update(TASKS[0])
    assert [updater.learner.initialization_seed(r) for r in ("expert", "consolidated")] == [112648, 217377]
    assert _updater(seed=3).learner.initialization_seed("expert") == 3 * 1_000_003 + 104_729


def test_rd_early_stopping_watches_the_consolidated_model_and_the_expert_trains_every_epoch() -> None:
    """``early_stopping_enabled`` and ``metric`` are the consolidation's: the expert (which has no
    validation data) runs its ``max_epochs`` and never early-stops."""
    class Recorder:
        def __init__(self) -> None:
            self.expert_epochs: set[float] = set()

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "expert_epoch" in metrics:
                self.expert_epochs.add(metrics["expert_epoch"])

    recorder = Recorder()
    updater = _updater(max_epochs=3, early_stopping_enabled=True, metric="val_loss", patience=1, logger=recorder)
    updater.update(TASKS[0], TASKS[1])
    assert recorder.expert_epochs == {0.0, 1.0, 2.0}
    assert updater.last_expert_fit is not None and updater.last_expert_fit.epochs == 3
    assert not updater.last_expert_fit.stopped_early
