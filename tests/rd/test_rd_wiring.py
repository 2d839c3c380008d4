"""Repeated Distillation's wiring, pinned one option or call at a time: the seeds' modulus, the
loss's shape checks, logit extraction from loaders and plain modules, the re-initialised copy's
class, dtype and random state, the learner's validation, the expert's Learner and logger, the
consolidation's seeded shuffle and loss, the progress bars and the updater's signature."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import retain.methods.repeated_distill as rd
from fake_terminal import Terminal
from retain.learners.base import Learner
from retain.memory import ReservoirMemory
from retain.methods.repeated_distill import (
    RepeatedDistillationLearner,
    RepeatedDistillationModelUpdater,
    double_distillation_loss,
    extract_logits,
    reinitialized_copy,
)
from retain.models import MultiLayerPerceptron

N = 40
SGD = functools.partial(torch.optim.SGD, lr=0.1)


def _task(seed: int = 10, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 4
    return TensorDataset(torch.randn(n, 6, generator=g) + targets[:, None].float(), targets)


def _mlp() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(6, 4, [16])


def _updater(**kw: Any) -> RepeatedDistillationModelUpdater:
    options: dict[str, Any] = dict(
        memory_size=10, batch_size=8, max_epochs=2, consolidation_epochs=3, consolidation_batch_size=4, seed=0
    )
    options.update(kw)
    return RepeatedDistillationModelUpdater(_mlp(), optimizer=SGD, accelerator="cpu", **options)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class _Stream(IterableDataset):
    """An IterableDataset of unknown length (no ``__len__``) over the items of a TensorDataset."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from zip(*self.data.tensors, strict=True)


class _Unregistered(MultiLayerPerceptron):
    """A ContinualModel subclass that is not in the model registry (re-initialised by deep copy)."""


# ------------------------------------------------------------------ seeds and the loss


def test_rd_initialisation_seeds_wrap_at_two_to_the_31_minus_one() -> None:
    """A large seed's derived seeds are reduced modulo 2**31 - 1 (values worked out by hand:
    5000 * 1_000_003 + 104_729 = 5_000_119_729 = 2 * 2_147_483_647 + 705_152_435)."""
    learner = _updater(seed=5000).learner
    assert learner.initialization_seed("expert") == 705_152_435
    assert learner.initialization_seed("consolidated") == 705_257_164


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4)], ids=["1-d", "3-d"])
def test_rd_loss_refuses_logits_that_are_not_one_row_per_item(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"must both have shape \(B, C\)"):
        double_distillation_loss(torch.zeros(shape), torch.zeros(shape))


# ------------------------------------------------------------------ extract_logits


def test_extract_logits_reads_a_dataloader_through_its_own_collate_function(map_dataset: type) -> None:
    data = _task()
    inputs, targets = data.tensors

    def doubling(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return torch.stack([x for x, _ in items]) * 2.0, torch.stack([y for _, y in items])

    loader = DataLoader(map_dataset(inputs, targets), batch_size=3, collate_fn=doubling)
    model = _mlp()
    with torch.no_grad():
        expected = model(inputs * 2.0)
    torch.testing.assert_close(extract_logits(model, loader, batch_size=7), expected)


def test_extract_logits_calls_a_plain_module_and_an_empty_memory_gives_its_width() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    inputs = _task().tensors[0]
    with torch.no_grad():
        expected = plain(inputs)
    torch.testing.assert_close(extract_logits(plain, _task(), batch_size=16), expected)
    # a plain module declares no num_outputs: an empty memory gives zero columns, not one
    assert extract_logits(plain, ReservoirMemory(5), batch_size=4).shape == (0, 0)


# ------------------------------------------------------------------ reinitialized_copy


def test_reinitialized_copy_of_an_unregistered_class_keeps_its_class_and_draws_seeded_weights() -> None:
    torch.manual_seed(0)
    model = _Unregistered(6, 4, [16])
    state = torch.get_rng_state()
    first, again, other = (reinitialized_copy(model, s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state), "the global random state changed"
    assert type(first) is _Unregistered and first is not model
    assert torch.equal(_flat(first), _flat(again)) and not torch.equal(_flat(first), _flat(other))
    assert not torch.equal(_flat(first), _flat(model)), "the copy kept the model's weights"


def test_reinitialized_copy_has_the_models_dtype_and_no_float64_cast_of_its_own() -> None:
    plain = reinitialized_copy(_mlp(), 3)
    assert next(plain.parameters()).dtype == torch.float32
    assert not getattr(plain, "_retain_float64", False)
    assert plain(torch.randn(2, 6)).dtype == torch.float32
    half = reinitialized_copy(_mlp().to(torch.bfloat16), 3)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    fresh = reinitialized_copy(_mlp(), 3)
    assert torch.equal(_flat(half), _flat(fresh).to(torch.bfloat16)), "not the same draw as the float32 copy"


# ------------------------------------------------------------------ the learner's options and checks


def test_rd_learner_requires_the_logits_column_and_replays_no_memory_batch() -> None:
    learner = _updater().learner
    assert learner.required_memory_metadata() == {"logits": (4,)}
    assert learner.memory_batch_size == 0


def test_rd_accepts_the_smallest_memory_epochs_and_batch() -> None:
    learner = _updater(memory_size=1, consolidation_epochs=1, consolidation_batch_size=1).learner
    assert (learner.memory.memory_size, learner.consolidation_epochs, learner.consolidation_batch_size) == (1, 1, 1)


@pytest.mark.parametrize("name", ["consolidation_epochs", "consolidation_batch_size"])
@pytest.mark.parametrize("value", [True, 2.5, "3", -1])
def test_rd_refuses_consolidation_options_that_are_not_positive_integers(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive integer or None, got {value!r}"):
        _updater(**{name: value})


def test_rd_refuses_several_devices() -> None:
    with pytest.raises(ValueError, match="devices=2 is not supported"):
        _updater(devices=2)


def test_rd_learner_refuses_expert_logits_that_are_not_rows_or_missing() -> None:
    learner = _updater().learner
    with pytest.raises(ValueError, match=r"expert logits must have shape \(N, C\), got \(40,\)"):
        learner.update_expert_logits(torch.zeros(N))
    with pytest.raises(ValueError, match="no expert logits: call update_expert_logits before the update"):
        learner.on_model_update_start(_task(), None)


@pytest.mark.parametrize(
    ("stream", "rows", "message"),
    [
        (False, N - 1, f"got expert logits for {N - 1} items, but the new data has {N}$"),
        (False, N + 1, f"got expert logits for {N + 1} items, but the new data has {N}$"),
        (True, N - 1, f"got expert logits for {N - 1} items, but the new data has more$"),
        (True, N + 1, f"got expert logits for {N + 1} items, but the new data has {N}$"),
    ],
    ids=["sized, too few", "sized, too many", "stream, too few", "stream, too many"],
)
def test_rd_learner_refuses_expert_logits_for_another_number_of_items(stream: bool, rows: int, message: str) -> None:
    learner = _updater().learner
    learner.update_expert_logits(torch.zeros(rows, 4))
    with pytest.raises(ValueError, match=message):
        learner.on_model_update_start(_Stream(_task()) if stream else _task(), None)
    assert len(learner.memory) <= 10


def test_rd_stream_with_the_right_number_of_logits_enters_the_memory() -> None:
    learner = _updater(memory_size=N).learner
    learner.update_expert_logits(torch.arange(N * 4, dtype=torch.float32).reshape(N, 4))
    learner.on_model_update_start(_Stream(_task()), None)
    inputs, targets, metadata = learner.memory.raw_items()
    torch.testing.assert_close(inputs, _task().tensors[0])
    assert torch.equal(targets, _task().tensors[1])
    torch.testing.assert_close(metadata["logits"], torch.arange(N * 4, dtype=torch.float32).reshape(N, 4))


def test_rd_consolidation_batches_are_gone_after_the_update() -> None:
    updater = _updater()
    updater.update(_task())
    with pytest.raises(AssertionError, match="call on_model_update_start first"):
        updater.learner.train_dataloader()


# ------------------------------------------------------------------ consolidation


def test_rd_consolidation_shuffles_the_memory_with_the_updates_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each consolidation epoch reads the memory in a new order drawn from the learner's seeded
    generator: the caller's global random state changes neither the order nor the model."""
    orders: list[list[Tensor]] = []
    real_step = RepeatedDistillationLearner.training_step

    def spy(self: RepeatedDistillationLearner, batch: Any, batch_idx: int) -> Tensor:
        orders[-1].append(batch[0].clone())
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(RepeatedDistillationLearner, "training_step", spy)
    served = []
    for outer in (1, 2):
        orders.append([])
        updater = _updater(consolidation_batch_size=10)
        torch.manual_seed(outer)
        served.append(_flat(updater.update(_task())))
    assert torch.equal(served[0], served[1])
    slots = updater.learner.memory.raw_items()[0]
    epochs = orders[-1]
    assert len(epochs) == 3 and all(e.shape == slots.shape for e in epochs)
    assert all(torch.equal(a, b) for a, b in zip(orders[0], orders[1], strict=True))
    assert not torch.equal(epochs[0], slots), "the memory was read in slot order"
    assert not torch.equal(epochs[0], epochs[1]), "every epoch read the same order"


def test_rd_consolidation_loss_is_the_double_distillation_of_the_transformed_memory_inputs() -> None:
    """training_step: mean over the batch of 0.5 * mean((f(transform(x)) - (z - mean(z)))^2), worked
    out here without double_distillation_loss; the prediction, not the target, is f's output."""
    updater = _updater(buffer_transform=lambda x: x * 0.5)
    updater.update(_task())
    learner = updater.learner
    x = learner.memory.raw_items()[0][:5]
    z = torch.arange(20, dtype=torch.float32).reshape(5, 4) * 0.3 + 2.0
    with torch.no_grad():
        outputs = updater.model(x * 0.5)
        expected = (0.5 * (outputs - (z - z.mean(1, keepdim=True))) ** 2).mean()
        got = learner.training_step((x, z), 0)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ the expert


class _Logger:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def test_rd_expert_is_a_plain_learner_with_the_updates_loss_optimizer_and_expert_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[dict[str, Any]] = []

    class SpyLearner(Learner):
        def __init__(self, **kwargs: Any) -> None:
            built.append(kwargs)
            super().__init__(**kwargs)

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    monkeypatch.setattr(rd, "Learner", SpyLearner)
    logger = _Logger()
    updater = _updater(loss_fn=loss_fn, logger=logger, early_stopping_enabled=True, metric="val_accuracy")
    seed = updater.learner.initialization_seed("expert")
    updater.update(_task(), _task(11, 12))
    (kwargs,) = built
    options = kwargs["options"]
    assert kwargs["loss_fn"] is updater.learner.loss_fn is loss_fn
    assert kwargs["optimizer"] is updater.learner.optimizer_factory
    assert kwargs["model"] is not updater.model
    assert (options.seed, options.early_stopping_enabled, options.metric) == (seed, False, None)
    expert_calls = [(m, s) for m, s in logger.calls if "expert_train_loss" in m]
    assert expert_calls and all(set(m) == {"expert_train_loss", "expert_epoch"} for m, _ in expert_calls)
    assert updater.last_expert_fit is not None
    assert [s for _, s in expert_calls] == [N // 8, 2 * N // 8], "the expert's metrics lost their steps"


def test_rd_expert_trains_and_reports_the_head_of_the_updates_task_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """With task_id 'b' the expert gets a 'b' head, trains it, and the memory's new items get the
    logits of that head (not of the default head)."""
    updater = _updater(memory_size=N)
    experts: list[nn.Module] = []
    starts: list[Tensor] = []
    real_train = updater.train_expert
    real_fit = rd.fit

    def spy_fit(learner: Learner, *args: Any, **kwargs: Any) -> Any:
        if learner is not updater.learner:
            assert learner.task_id == "b"
            starts.append(_flat(learner.model))
        return real_fit(learner, *args, **kwargs)

    def spy_train(*args: Any, **kwargs: Any) -> nn.Module:
        experts.append(real_train(*args, **kwargs))
        return experts[-1]

    monkeypatch.setattr(rd, "fit", spy_fit)
    monkeypatch.setattr(updater, "train_expert", spy_train)
    fresh = reinitialized_copy(updater.model, updater.learner.initialization_seed("expert"), "b")
    stored: list[Tensor] = []
    real_set = updater.learner.update_expert_logits
    monkeypatch.setattr(updater.learner, "update_expert_logits", lambda z: (stored.append(z.clone()), real_set(z)))
    updater.update(_task(), task_id="b")
    (expert,) = experts
    assert torch.equal(starts[0], _flat(fresh)), "the expert did not start from the seeded copy with a 'b' head"
    inputs = _task().tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(stored[0], expert(inputs, "b"))
        assert not torch.allclose(stored[0], expert(inputs))


def test_rd_uses_the_train_collate_function_for_the_expert_its_logits_and_the_memory(map_dataset: type) -> None:
    """A custom collate function reads the new data every time, in this order: the expert's data
    check (one batch), its two epochs (5 batches each), its logits (one batch of up to 256 items),
    the consolidation's data check, and the memory writes (one batch of up to 256 items)."""
    calls: list[int] = []

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        calls.append(len(items))
        return torch.stack([x for x, _ in items]) + 1.0, torch.stack([y for _, y in items])

    data = _task()
    updater = _updater(memory_size=N, consolidation_epochs=1)
    updater.update(map_dataset(*data.tensors), train_dataset_collate_fn=collate)
    assert calls == [8] + [8] * 10 + [N] + [8] + [N]
    torch.testing.assert_close(updater.learner.memory.raw_items()[0], data.tensors[0] + 1.0)


def test_rd_checks_the_validation_options_before_the_expert_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    updater = _updater(metric="val_loss")
    monkeypatch.setattr(updater, "train_expert", lambda *a, **k: pytest.fail("the expert trained"))
    with pytest.raises(ValueError, match="metric='val_loss' monitors validation metrics, but this update has no"):
        updater.update(_task())


def test_rd_progress_bars_name_the_expert_and_the_consolidation(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _updater(progress_bar=True).update(_task())
    assert "RepeatedDistillationModelUpdater expert default_task epoch 2/2" in terminal.text, terminal.text
    assert "RepeatedDistillationModelUpdater consolidation default_task epoch 3/3" in terminal.text, terminal.text


def test_rd_signature_defaults_and_kinds() -> None:
    parameters = inspect.signature(RepeatedDistillationModelUpdater).parameters
    memory_size = parameters["memory_size"]
    assert (memory_size.kind, memory_size.default, memory_size.annotation) == (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, 500, int,
    )  # fmt: skip
    for name in ("consolidation_epochs", "consolidation_batch_size"):
        p = parameters[name]
        assert (p.kind, p.default, p.annotation) == (inspect.Parameter.KEYWORD_ONLY, None, "int | None"), name
    assert parameters["seed"].default is None
    assert list(parameters)[:4] == ["model", "loss_fn", "optimizer", "memory_size"]
    doc = RepeatedDistillationModelUpdater.__init__.__doc__ or RepeatedDistillationModelUpdater.__doc__ or ""
    assert "epochs of the consolidation on the memory" in doc


class _SplitStream(IterableDataset):
    """A stream that DataLoader workers split between them: worker k of n yields items k, k + n, ..."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        items = range(len(self.data)) if info is None else range(info.id, len(self.data), info.num_workers)
        for i in items:
            yield self.data[i]


def test_extract_logits_reads_a_split_stream_in_the_workers_order() -> None:
    """With 2 workers and batches of 3, the 12 items come as batches of worker 0, 1, 0, 1:
    items 0 2 4 | 1 3 5 | 6 8 10 | 7 9 11 (one process would give 0 ... 11)."""
    from retain.batching import LoaderOptions

    data = TensorDataset(*(t[:12] for t in _task().tensors))
    model = _mlp()
    order = [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    with torch.no_grad():
        expected = model(data.tensors[0][order])
    got = extract_logits(model, _SplitStream(data), batch_size=3, loader_options=LoaderOptions(num_workers=2))
    torch.testing.assert_close(got, expected)


def test_rd_gives_each_item_of_a_split_stream_its_own_expert_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The expert's logits are read with the update's workers, as the memory writes are: the logits
    stored with each item are the expert's logits of that item."""
    updater = _updater(memory_size=N, max_epochs=1, consolidation_epochs=1, num_workers=2)
    experts: list[nn.Module] = []
    real_train = updater.train_expert
    monkeypatch.setattr(updater, "train_expert", lambda *a, **k: experts.append(real_train(*a, **k)) or experts[-1])
    added: list[tuple[Tensor, Tensor]] = []
    real_add = updater.learner.memory.add

    def spy_add(inputs: Tensor, targets: Tensor, metadata: dict[str, Tensor]) -> Any:
        added.append((inputs.clone(), metadata["logits"].clone()))
        return real_add(inputs, targets, metadata)

    monkeypatch.setattr(updater.learner.memory, "add", spy_add)
    updater.update(_SplitStream(_task()))
    inputs = torch.cat([x for x, _ in added])
    logits = torch.cat([z for _, z in added])
    assert inputs.shape[0] == N and not torch.equal(inputs, _task().tensors[0]), "not read in the workers' order"
    with torch.no_grad():
        torch.testing.assert_close(logits, experts[0](inputs))


def test_rd_does_not_warn_while_one_task_id_is_used() -> None:
    import warnings

    updater = _updater(consolidation_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        updater.update(_task(), task_id="a")
        updater.update(_task(11), task_id="a")
    assert updater.learner.task_ids_seen == ["a"]

