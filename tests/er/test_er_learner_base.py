"""The base learners' own behaviour, through the public updaters where a user sees it: option
checks of ``Learner`` / ``ReplayLearner``, the seed and counters, the validation metrics (their
reduction, batching, transforms and extra metrics), the best-epoch copy of a served model, the
memory's transform fallbacks and the check that new inputs can join the memory."""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_er_learners import mlp
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from retain.learners.base import Learner, ReplayLearner, _cast_floating_inputs, check_joinable, use_float64
from retain.methods import (
    CLSExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
)
from retain.options import TrainingOptions
from retain.updaters import loop

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def blobs(n: int, seed: int = 0, classes: tuple[int, ...] = (0, 1, 2)) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    return TensorDataset(torch.randn(n, 4, generator=g) + y[:, None].float(), y)


# ------------------------------------------------------------------ construction
def test_training_options_given_both_as_options_and_as_keywords_are_refused() -> None:
    with pytest.raises(TypeError, match="either as `options` or as keyword arguments, not both"):
        Learner(mlp(), optimizer=SGD, options=TrainingOptions(), batch_size=8)
    learner = Learner(mlp(), optimizer=SGD, options=TrainingOptions(batch_size=7))
    assert learner.train_batch_size == 7


def test_the_feature_layers_option_hooks_the_named_layers() -> None:
    """``feature_layers`` replaces the model's own intermediate representations by the named submodules'."""
    model = mlp(hidden=(8, 6))
    learner = Learner(model, optimizer=SGD, feature_layers=["layers.1"])
    assert learner.model.feature_layers == ["layers.1"]
    learner.model(torch.randn(2, 4))
    (features,) = learner.model.get_intermediate_representation()
    assert features.shape == (2, 6)  # the output of layers.1 only, not both hidden layers


def test_use_float64_casts_floating_inputs_once_and_leaves_the_rest() -> None:
    model = mlp()
    assert use_float64(model) is model and use_float64(model) is model
    assert len(model._forward_pre_hooks) == 1, "a second call must not add a second hook"
    assert model._retain_float64 is True
    assert model(torch.randn(2, 4)).dtype == torch.float64
    f32, f64, labels = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.arange(2)
    cast = _cast_floating_inputs(model, (f32, labels, "x", f64))
    assert cast[0].dtype == torch.float64 and cast[1] is labels and cast[2] == "x" and cast[3] is f64


def test_an_unseeded_learner_draws_its_own_seed_in_0_to_2_to_the_31() -> None:
    """``seed=None``: each learner draws a fresh seed (below 2**31, spread over that range), and
    its generator starts from it."""
    learners = [Learner(mlp(), optimizer=SGD, seed=None) for _ in range(8)]
    seeds = [learner.seed for learner in learners]
    assert all(0 <= s < 2**31 for s in seeds), seeds
    assert len(set(seeds)) == 8 and max(seeds) > 2**20, seeds
    assert all(learner.generator.initial_seed() == learner.seed for learner in learners)
    assert Learner(mlp(), optimizer=SGD, seed=11).seed == 11


def test_the_base_learner_keeps_no_memory_and_requires_no_metadata() -> None:
    learner = Learner(mlp(), optimizer=SGD)
    assert learner.memory_for_state() is None
    assert learner.required_memory_metadata() == {}
    assert learner.output_shape() == (3,)
    assert learner.masked_classes is None  # no mask_unused_classes: nothing masked
    assert learner.compute_validation_metrics() == {}  # nothing validated yet
    assert learner.val_dataloader() is None and not learner.has_train_data
    assert learner.loss_fn.reduction == "none"  # per-item losses: the base loss and val_loss average them


REPLAY_REFUSED = [
    ({"memory_size": True}, "memory_size must be an integer >= 0, got True"),
    ({"memory_size": -1}, "memory_size must be an integer >= 0, got -1"),
    ({"memory_size": 2.0}, "memory_size must be an integer >= 0, got 2.0"),
    ({"batch_memory_frac": 1.0}, "batch_memory_frac must lie in [0, 1), got 1.0"),
    ({"batch_memory_frac": -0.25}, "batch_memory_frac must lie in [0, 1), got -0.25"),
    ({"memory_batch_size": -1}, "memory_batch_size must be an integer >= 0 or None, got -1"),
    ({"memory_batch_size": 2.5}, "memory_batch_size must be an integer >= 0 or None, got 2.5"),
]


@pytest.mark.parametrize(("kwargs", "message"), REPLAY_REFUSED, ids=lambda v: str(v))
def test_replay_learner_refuses_bad_memory_options(kwargs: dict[str, Any], message: str) -> None:
    options = {"memory_size": 10, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        ReplayLearner(model=mlp(), optimizer=SGD, **options)


def test_replay_learner_accepts_the_edges_of_its_options() -> None:
    empty = ReplayLearner(model=mlp(), optimizer=SGD, memory_size=0, batch_memory_frac=0.0, batch_size=8)
    assert (empty.memory.memory_size, empty.memory_batch_size, empty.train_batch_size) == (0, 0, 8)
    direct = ReplayLearner(model=mlp(), optimizer=SGD, memory_size=5, memory_batch_size=0, batch_size=8)
    assert (direct.memory_batch_size, direct.train_batch_size) == (0, 8)
    split = ReplayLearner(model=mlp(), optimizer=SGD, memory_size=5, batch_memory_frac=0.25, batch_size=8)
    assert (split.memory_batch_size, split.train_batch_size) == (2, 6)
    assert split.memory_for_state() is split.memory


# ------------------------------------------------------------------ counters and task ids
def test_steps_updates_and_task_ids_are_counted_across_updates() -> None:
    updater = ExperienceReplayModelUpdater(
        mlp(), optimizer=SGD, memory_size=10, batch_size=8, max_epochs=2, accelerator="cpu"
    )  # 4 new items per step: 16 items -> 4 steps per epoch
    learner = updater.learner
    assert (learner.global_step, learner.updates_done, learner.task_ids_seen) == (0, 0, [])
    updater.update(blobs(16), task_id="a")
    assert (learner.global_step, learner.updates_done, learner.task_ids_seen) == (8, 1, ["a"])
    updater.update(blobs(16, seed=1), task_id="a")
    updater.update(blobs(8, seed=2), task_id="b")
    assert (learner.global_step, learner.updates_done, learner.task_ids_seen) == (20, 3, ["a", "b"])
    assert learner.task_id == "b" and not learner.has_train_data


# ------------------------------------------------------------------ validation
def _val_run(monkeypatch: pytest.MonkeyPatch, updater: Any, *datasets: Any) -> list[list[int]]:
    """Runs ``updater.update(*datasets)`` and returns the batch sizes each validation pass saw."""
    passes: list[list[int]] = []
    real = loop.validate

    def validate(learner: Learner) -> dict[str, float]:
        passes.append([])
        step = learner.validation_step

        def recording(batch: Any, batch_idx: int) -> None:
            passes[-1].append(int(batch[1].shape[0]))
            step(batch, batch_idx)

        learner.validation_step = recording  # type: ignore[method-assign]
        try:
            return real(learner)
        finally:
            del learner.validation_step

    monkeypatch.setattr(loop, "validate", validate)
    updater.update(*datasets)
    return passes


def test_val_loss_and_accuracy_are_means_over_items_with_the_test_transforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 val items come in batches of max(batch_size, 256) = 256 and 44; val_loss is the mean
    cross-entropy over the 300 items (not the mean of the two batch means), val_accuracy the
    micro accuracy, both on test-transformed inputs and targets; logged_metrics add val_NAME."""
    import torchmetrics

    val = blobs(300, seed=5)
    top2 = torchmetrics.classification.MulticlassAccuracy(num_classes=3, top_k=2, average="micro")
    updater = FineTuningModelUpdater(
        mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu", metric="val_loss",
        test_transform=lambda x: 2.0 * x, test_target_transform=lambda y: (y + 1) % 3,
        logged_metrics={"top2": top2},
    )  # fmt: skip
    passes = _val_run(monkeypatch, updater, blobs(16), val)
    assert passes == [[256, 44]]
    model = updater.learner.model
    with torch.no_grad():
        logits = model(2.0 * val.tensors[0])
    targets = (val.tensors[1] + 1) % 3
    metrics = updater.last_fit.history[-1]
    assert metrics["val_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    assert metrics["val_accuracy"] == pytest.approx(accuracy, rel=1e-6)
    in_top2 = (logits.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    assert metrics["val_top2"] == pytest.approx(in_top2, rel=1e-6)
    assert in_top2 != pytest.approx(accuracy)  # the extra metric is not the accuracy again


def test_val_accuracy_is_micro_not_macro(monkeypatch: pytest.MonkeyPatch) -> None:
    """On imbalanced val data the two averages differ: the documented val_accuracy is the share of items right."""
    y = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    g = torch.Generator().manual_seed(3)
    val = TensorDataset(torch.randn(40, 4, generator=g), y)
    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu",
                                     metric="val_accuracy", mode="max")  # fmt: skip
    updater.update(blobs(16), val)
    with torch.no_grad():
        predicted = updater.learner.model(val.tensors[0]).argmax(1)
    micro = (predicted == y).float().mean().item()
    macro = sum((predicted[y == c] == c).float().mean().item() for c in range(3)) / 3
    assert abs(micro - macro) > 1e-3
    assert updater.last_fit.history[-1]["val_accuracy"] == pytest.approx(micro, rel=1e-6)


def test_stored_val_data_of_an_earlier_update_is_validated_in_batches_of_256(monkeypatch: pytest.MonkeyPatch) -> None:
    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu")
    updater.update(blobs(16), blobs(300, seed=5))
    passes = _val_run(monkeypatch, updater, blobs(16, seed=1), blobs(260, seed=6))
    assert passes == [[256, 44, 256, 4]]  # the stored 300 items, then this update's 260


# ------------------------------------------------------------------ best epoch of a served copy
def test_metric_restores_the_best_epoch_of_the_served_copy_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLS-ER serves its stable copy: with ``metric``, both the working model and the stable copy
    come back as they were at the best epoch (epoch 2 of 4 here)."""
    values = [3.0, 1.0, 2.0, 4.0]
    seen: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def validate(learner: Learner) -> dict[str, float]:
        seen.append(
            (
                {k: v.clone() for k, v in learner.model.state_dict().items()},
                {k: v.clone() for k, v in learner.inference_model().state_dict().items()},
            )
        )
        return {"val_loss": values[len(seen) - 1], "val_accuracy": 0.0}

    monkeypatch.setattr(loop, "validate", validate)
    updater = CLSExperienceReplayModelUpdater(
        mlp(), optimizer=SGD, memory_size=20, batch_size=8, max_epochs=4, accelerator="cpu", metric="val_loss",
        stable_model_update_probability=1.0, stable_model_update_weight=0.5,
    )  # fmt: skip
    served = updater.update(blobs(24), blobs(8, seed=9))
    working_best, served_best = seen[1]
    assert served is not updater.learner.model
    for key, value in served.state_dict().items():
        assert torch.equal(value, served_best[key]), key
    for key, value in updater.learner.model.state_dict().items():
        assert torch.equal(value, working_best[key]), key
    assert not torch.equal(seen[-1][1]["heads.default_task.weight"], served_best["heads.default_task.weight"])
    assert updater.learner.best_state is None


# ------------------------------------------------------------------ the memory's transforms
def test_without_buffer_transforms_memory_items_go_through_the_train_transforms() -> None:
    """``buffer_transform`` / ``buffer_target_transform`` default to the train transforms."""
    updater = ExperienceReplayModelUpdater(
        mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.0), memory_size=20, batch_size=8,
        memory_batch_size=4, max_epochs=1, accelerator="cpu",
        train_transform=lambda x: x + 100.0, train_target_transform=lambda y: (y + 1) % 3,
    )  # fmt: skip
    updater.update(blobs(16))
    memory = updater.learner.memory
    batch = memory.sample(4)
    raw_inputs, raw_targets, _ = memory.raw_items()
    torch.testing.assert_close(batch.inputs, raw_inputs[batch.indices] + 100.0)
    assert torch.equal(batch.targets, (raw_targets[batch.indices] + 1) % 3)


# ------------------------------------------------------------------ new inputs joining the memory
class _CastingModel(nn.Module):
    """A plain module that takes any numeric input of 4 features (cast to float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.float().reshape(x.shape[0], -1)[:, :4])


def test_new_inputs_of_another_dtype_cannot_join_the_memory() -> None:
    torch.manual_seed(0)
    updater = ExperienceReplayModelUpdater(_CastingModel(), optimizer=SGD, memory_size=10, batch_size=4,
                                           max_epochs=1, accelerator="cpu")  # fmt: skip
    updater.update(blobs(8))
    other = TensorDataset(blobs(8).tensors[0].double(), blobs(8).tensors[1])
    message = (
        "train_dataset: raw inputs of per-item shape (4,) and dtype torch.float64 cannot join the memory, "
        "which holds (4,) torch.float32 from earlier updates"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        updater.update(other)
    updater.update(blobs(8, seed=1))  # the same kind of inputs still joins


def test_check_joinable_compares_leaves_dtypes_and_dims_but_not_lengths() -> None:
    check_joinable(torch.zeros(2, 5), torch.zeros(3, 7))  # lengths may differ (the memory pads)
    check_joinable({"a": torch.zeros(2, 3)}, {"a": torch.ones(4, 9)})
    leaves = "inputs with leaves ['a'] cannot join the memory, which holds leaves ['b']"
    with pytest.raises(ValueError, match=re.escape(leaves)):
        check_joinable({"a": torch.zeros(2, 3)}, {"b": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=re.escape("raw inputs.a of per-item shape (3, 2) and dtype torch.float32")):
        check_joinable({"a": torch.zeros(2, 3, 2)}, {"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=re.escape("which holds (3,) torch.int64")):
        check_joinable(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_a_learner_without_val_data_but_with_a_metric_is_refused_when_nothing_is_stored() -> None:
    """``validation_data='current'`` keeps no earlier val data: a monitored update needs its own."""
    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu",
                                     metric="val_loss", validation_data="current")  # fmt: skip
    updater.update(blobs(16), blobs(8, seed=1))
    message = r"^metric='val_loss' monitors validation metrics, but this update has no val_dataset: pass one$"
    with pytest.raises(ValueError, match=message):
        updater.update(blobs(16, seed=2))


def test_the_learning_rate_scheduler_is_built_on_the_learners_optimizer() -> None:
    built: list[torch.optim.Optimizer] = []

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        built.append(optimizer)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    learner = Learner(mlp(), optimizer=SGD, learning_rate_scheduler=scheduler)
    optimizer, sched = learner.configure_optimizers()
    assert built == [optimizer] and sched.optimizer is optimizer
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(learner.model.parameters())
    assert Learner(mlp(), optimizer=SGD).configure_optimizers()[1] is None
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.05)


def test_the_data_check_probes_in_eval_mode_and_restores_the_training_flag() -> None:
    """``on_model_update_start`` runs the model on two items to check the data: in eval mode (a
    BatchNorm's running statistics do not move) and with the model's training flag restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    learner = Learner(model, optimizer=SGD, batch_size=8)
    stats = learner.model.state_dict()
    before = {k: v.clone() for k, v in stats.items() if "running" in k or "num_batches" in k}
    for training in (True, False):
        learner.model.train(training)
        learner.on_model_update_start(blobs(16), blobs(8, seed=1))
        assert learner.model.training is training
        learner.on_model_update_end()
    after = learner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------ data the model cannot take
def _mismatched_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    x = torch.stack([item[0] for item in items])
    y = torch.stack([item[1] for item in items])
    return x, y[:-1]  # one target short


def _ragged_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
    x = torch.stack([item[0] for item in items])
    return {"a": x, "b": x[:-1]}, torch.stack([item[1] for item in items])


def test_batches_whose_inputs_and_targets_disagree_are_refused_before_training(map_dataset: type) -> None:
    data = blobs(16)
    dataset = map_dataset(*data.tensors)
    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu")
    with pytest.raises(ValueError, match=r"^train_dataset: 8 inputs but 7 targets in a batch$"):
        updater.update(dataset, train_dataset_collate_fn=_mismatched_collate)
    with pytest.raises(ValueError, match=r"^train_dataset: nested inputs: .*b.* has 7 rows, .*a.* has 8$"):
        updater.update(dataset, train_dataset_collate_fn=_ragged_collate)
    assert updater.learner.global_step == 0


class _Flat(nn.Module):
    """Returns one value per item, not (B, C) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).sum(1)


def test_a_model_that_does_not_return_2d_logits_is_refused_before_training() -> None:
    torch.manual_seed(0)
    updater = FineTuningModelUpdater(_Flat(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu")
    message = "the model must return logits of shape (B, C), got (2,)"
    with pytest.raises(ValueError, match=r"^train_dataset: inputs .* do not fit the model .*: " + re.escape(message)):
        updater.update(blobs(16))


def test_the_class_mask_of_a_map_dataset_is_read_from_its_labels(map_dataset: type) -> None:
    data = blobs(16, classes=(0, 2))
    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu",
                                     mask_unused_classes=True)  # fmt: skip
    updater.update(map_dataset(*data.tensors))
    assert updater.learner.masked_classes == [0, 2]


# ------------------------------------------------------------------ the learner's checkpoint
def test_the_learner_checkpoint_restores_counters_task_ids_generator_and_best_epoch() -> None:
    from retain.learners.base import new_checkpoint

    updater = FineTuningModelUpdater(mlp(), optimizer=SGD, batch_size=8, max_epochs=1, accelerator="cpu", seed=3)
    updater.update(blobs(16), task_id="a")
    updater.update(blobs(8, seed=1), task_id="b")
    saved = updater.learner
    saved.generator.manual_seed(77)
    torch.rand(3, generator=saved.generator)  # a generator state that no seed gives
    saved.snapshot_best()  # inside an update (a resume checkpoint) the best epoch's weights are kept too
    checkpoint = new_checkpoint()
    saved.on_save_checkpoint(checkpoint)
    assert (checkpoint["json"]["global_step"], checkpoint["json"]["updates_done"]) == (3, 2)
    loaded = Learner(mlp(1), optimizer=SGD, seed=0)
    loaded.on_load_checkpoint(checkpoint)
    assert (loaded.global_step, loaded.updates_done, loaded.task_ids_seen) == (3, 2, ["a", "b"])
    assert torch.equal(loaded.generator.get_state(), saved.generator.get_state())
    assert loaded.best_state is not None and loaded.best_state.keys() == saved.best_state.keys()
    for key, value in saved.best_state.items():
        assert torch.equal(loaded.best_state[key], value), key
    for task_id in ("a", "b"):  # the updater adds the state's heads before loading
        loaded.model.add_task_params(task_id)
    loaded.restore_best()
    for key, value in saved.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    saved.best_state = None
    plain = new_checkpoint()
    saved.on_save_checkpoint(plain)
    assert not any(k.startswith("best_state.") for k in plain["tensors"])
    loaded.on_load_checkpoint(plain)
    assert loaded.best_state is None


class _Items(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset (read through a DataLoader)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.data[i]


def test_a_ranks_shard_keeps_the_collate_function_and_loader_options_of_the_train_data() -> None:
    """``use_train_shard`` (what a DDP rank trains on) reads its items as the whole train data
    would: same collate function, same DataLoader settings (workers, pinning), same name in errors."""
    from retain.batching import LoaderOptions

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    learner = Learner(mlp(), optimizer=SGD, batch_size=4, num_workers=2, persistent_workers=False)
    learner.on_model_update_start(_Items(blobs(12)), None, train_dataset_collate_fn=collate)
    learner.use_train_shard(torch.tensor([0, 3, 5, 7]), 2)
    shard = learner.train_dataloader()
    assert shard.loader_options == LoaderOptions(2, False, False)
    assert shard.collate_fn is collate and shard.where == "train_dataset"
    assert len(shard.dataset) == 4 and shard.batch_size == 2
