"""The replay hot path (not timed): per step no DataLoader, no new data source, no reallocated
memory, no host sync; the memory lives on the model's device; the loop's loss bookkeeping."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import retain.batching
import retain.learners.base
import retain.updaters.base
import retain.updaters.loop as loop
from retain import (
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    MultiLayerPerceptron,
    NonFiniteLossError,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
UPDATERS = {
    "ER": (ExperienceReplayModelUpdater, {"alpha": 1.0}),
    "DER++": (DarkExperienceReplayModelUpdater, {"alpha": 0.5, "beta": 1.0}),
}
ITEMS, BATCH, EPOCHS = 120, 10, 2  # 12 steps per epoch


def _data(seed: int, n: int = ITEMS) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(n) % 4)


def _updater(cls, method_kwargs: dict, device: str = "cpu", **options):
    torch.manual_seed(0)
    return cls(
        MultiLayerPerceptron(16, 4, [8]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        train_transform=lambda x: x.float() / 255,
        accelerator="cuda" if device == "cuda" else "cpu",
        **method_kwargs,
        **{"batch_size": BATCH, "max_epochs": EPOCHS, **options},
    )


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts DataLoader constructions and iterations, BatchSource constructions and epochs."""
    counts = {"DataLoader()": 0, "iter(DataLoader)": 0, "BatchSource()": 0, "iter(BatchSource)": 0}

    def counting(name: str, real):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return real(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(DataLoader, "__init__", counting("DataLoader()", DataLoader.__init__))
    monkeypatch.setattr(DataLoader, "__iter__", counting("iter(DataLoader)", DataLoader.__iter__))
    source = retain.batching.BatchSource
    monkeypatch.setattr(source, "__init__", counting("BatchSource()", source.__init__))
    monkeypatch.setattr(source, "__iter__", counting("iter(BatchSource)", source.__iter__))
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(UPDATERS))
def test_replay_update_builds_its_data_once_and_keeps_memory_on_the_model_device(
    counts: dict[str, int], method: str, device: str
) -> None:
    cls, kwargs = UPDATERS[method]
    updater = _updater(cls, {**kwargs, "memory_size": 30, "memory_batch_size": BATCH}, device)
    sampled = {"n": 0}
    memory = updater.learner.memory
    real_sample = memory.sample

    def counting_sample(k: int):
        sampled["n"] += 1
        return real_sample(k)

    memory.sample = counting_sample  # type: ignore[method-assign]
    updater.update(_data(0))
    storage = {name: t.data_ptr() for name, t in [("inputs", memory.inputs), ("targets", memory.targets)]}
    storage.update({name: t.data_ptr() for name, t in memory.metadata.items()})
    updater.update(_data(1))

    steps = 2 * EPOCHS * ITEMS // BATCH
    assert updater.learner.global_step == steps
    assert counts == {"DataLoader()": 0, "iter(DataLoader)": 0, "BatchSource()": 2, "iter(BatchSource)": 2 * EPOCHS}
    # ER draws one memory batch per step, DER++ two; the very first step finds the memory empty.
    per_step = 1 if method == "ER" else 2
    assert sampled["n"] == per_step * (steps - 1)
    # The preallocated storage is reused by every write of the second update (never reallocated).
    after = {name: t.data_ptr() for name, t in [("inputs", memory.inputs), ("targets", memory.targets)]}
    after.update({name: t.data_ptr() for name, t in memory.metadata.items()})
    assert after == storage
    assert sorted(memory.metadata) == ([] if method == "ER" else ["logits"])
    model_device = next(updater.model.parameters()).device
    assert model_device.type == device and memory.device == model_device
    for tensor in [memory.inputs, memory.targets, *memory.metadata.values(), memory.sample(4).inputs]:
        assert tensor is not None and tensor.device == model_device


@pytest.mark.parametrize("method", list(UPDATERS))
def test_no_host_sync_per_step(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Tensor-to-Python conversions in the loop happen once per log window, not once per step."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    cls, kwargs = UPDATERS[method]
    updater = _updater(cls, {**kwargs, "memory_size": 30, "memory_batch_size": BATCH}, log_every_n_steps=8)
    updater.update(_data(0))  # on_model_update_start reads the labels' range: not per step
    before = reads["n"]
    real_fit = loop.fit

    def counting_fit(*args, **kwargs):
        reads["n"] = 0
        result = real_fit(*args, **kwargs)
        reads["fit"] = reads["n"]
        return result

    monkeypatch.setattr(retain.updaters.base, "fit", counting_fit)
    updater.update(_data(1))
    steps = EPOCHS * ITEMS // BATCH
    assert before > 0  # the counter works
    windows = steps // 8 + EPOCHS  # reads every 8 global steps, plus each epoch's remainder
    assert 0 < reads["fit"] <= windows < steps


def _recording(updater) -> list[Tensor]:
    """Makes the learner record every step's loss (a copy, in step order)."""
    learner = updater.learner
    losses: list[Tensor] = []
    real_step = learner.training_step

    def step(batch, batch_idx):
        loss = real_step(batch, batch_idx)
        losses.append(loss.detach().clone())
        return loss

    learner.training_step = step
    return losses


class _Log:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))


def test_logged_loss_is_the_exact_window_mean_and_pending_losses_stay_bounded(monkeypatch) -> None:
    """A window longer than the loop's pending limit (256) is folded on the way: the logged value
    is still the float32 sum of the window's losses in step order, divided by its length."""
    pending_sizes: list[int] = []
    real_fold = loop._fold

    def fold(pending, loss_sum):
        pending_sizes.append(len(pending))
        return real_fold(pending, loss_sum)

    monkeypatch.setattr(loop, "_fold", fold)
    log = _Log()
    updater = _updater(FineTuningModelUpdater, {}, max_epochs=1, log_every_n_steps=300, logger=log)
    losses = _recording(updater)
    updater.update(_data(2, n=4000))  # 400 steps: windows of 300 and 100

    assert len(losses) == 400 and max(pending_sizes) <= loop._MAX_PENDING
    train = [(step, row["train_loss"]) for step, row in log.rows if "train_loss" in row]
    expected = []
    for window in (losses[:300], losses[300:]):
        total = torch.zeros(())
        for loss in window:
            total += loss
        expected.append(float(total) / len(window))
    assert train == [(300, expected[0]), (400, expected[1])]


@pytest.mark.parametrize("bad_step", [3, 270])
def test_non_finite_loss_names_its_step_before_and_after_a_fold(bad_step: int) -> None:
    updater = _updater(FineTuningModelUpdater, {}, max_epochs=1, log_every_n_steps=1000)
    learner = updater.learner
    real_step = learner.training_step

    def step(batch, batch_idx):
        loss = real_step(batch, batch_idx)
        return loss * math.nan if learner.global_step == bad_step else loss

    learner.training_step = step
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step} "):
        updater.update(_data(3, n=3000))
    # Raised at the first read after the bad step: the fold of the first 256 losses (before the
    # 256th step's on_train_batch_end), or the end of the epoch (300 steps).
    assert learner.global_step == (255 if bad_step < 256 else 300)


def test_learner_data_sources_are_the_batching_fast_path() -> None:
    """Tensor-backed data is moved to the device once: the source holds the dataset's tensors."""
    updater = _updater(ExperienceReplayModelUpdater, {"memory_size": 10})
    data = _data(4)
    updater.learner.on_model_update_start(data, None)
    source = updater.learner.train_dataloader()
    assert isinstance(source, retain.learners.base.BatchSource)
    assert source.tensors is not None and source.tensors[0].data_ptr() == data.tensors[0].data_ptr()
