"""The training options reach the training loop: schedulers step per epoch or per step, the
transforms reach new and replayed items, gradient clipping and determinism apply for the update
only, loggers get each phase's metrics, and RD's seed sets its fresh weights."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fake_terminal import Terminal
from retain import MultiLayerPerceptron
from retain.learners import components as comp
from retain.methods import (
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    RepeatedDistillationModelUpdater,
)
from retain.methods.baselines import reset_parameters

ITEMS, BATCH = 12, 4


def data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(ITEMS, 4, generator=g), torch.arange(ITEMS) % 3)


def mlp() -> MultiLayerPerceptron:
    torch.manual_seed(0)
    return MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,))


class Recorder:
    """A logger keeping every ``log_metrics`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


@pytest.mark.parametrize(("interval", "steps"), [("epoch", 3), ("step", 3 * ITEMS // BATCH)])
def test_the_scheduler_steps_at_its_interval(interval: str, steps: int) -> None:
    updater = FineTuningModelUpdater(
        mlp(), optimizer=functools.partial(torch.optim.SGD, lr=1.0), batch_size=BATCH, max_epochs=3,
        accelerator="cpu", learning_rate_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1,
                                                                     gamma=0.5),
        learning_rate_scheduler_interval=interval,
    )  # fmt: skip
    updater.update(data())
    assert updater.last_fit is not None and updater.last_fit.optimization is not None
    assert updater.last_fit.optimization.optimizer.param_groups[0]["lr"] == pytest.approx(0.5**steps)


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_gradient_clipping_by_value_bounds_every_step(precision: str) -> None:
    """With clip value c and SGD lr 1, no weight moves by more than c in one step; with a gradient
    scaler the gradients are unscaled before clipping (else the move would be c / scale)."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    updater = FineTuningModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=1.0), batch_size=ITEMS,
                                     max_epochs=1, accelerator="cpu", gradient_clip_val=1e-3,
                                     gradient_clip_algorithm="value", precision=precision)  # fmt: skip
    updater.update(data())
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True))
    assert moved == pytest.approx(1e-3, rel=1e-5)  # clipped: the largest gradient entry is far above 1e-3


@pytest.mark.parametrize("enabled", [False, True])
def test_deterministic_trainer_is_on_for_the_update_only(enabled: bool) -> None:
    seen: list[bool] = []

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        seen.append(torch.are_deterministic_algorithms_enabled())
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    before = torch.are_deterministic_algorithms_enabled()
    FineTuningModelUpdater(mlp(), loss_fn, functools.partial(torch.optim.SGD, lr=0.1), batch_size=BATCH,
                           max_epochs=1, accelerator="cpu", deterministic_trainer=enabled).update(data())  # fmt: skip
    assert seen and set(seen) == {enabled}
    assert torch.are_deterministic_algorithms_enabled() == before


def test_transforms_reach_new_and_replayed_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_transform on the new batch, buffer_transform on memory items (raw items are stored),
    and the target transforms likewise."""
    forwarded: list[Tensor] = []
    memory_targets: list[tuple[Tensor, Tensor]] = []
    real = comp.WeightedCustomLossComponent.loss

    def loss(self: Any, outputs: Tensor, batch_memory: Any, features: Any) -> Tensor:
        raw = updater.learner.memory.raw_items()[1][batch_memory.indices]
        memory_targets.append((batch_memory.targets.clone(), raw.clone()))
        return real(self, outputs, batch_memory, features)

    monkeypatch.setattr(comp.WeightedCustomLossComponent, "loss", loss)
    model = mlp()
    model.register_forward_hook(lambda m, args, out: forwarded.append(args[0].detach().clone()) if m.training else None)
    updater = ExperienceReplayModelUpdater(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.0), memory_size=20, batch_size=BATCH,
        memory_batch_size=3, max_epochs=2, accelerator="cpu",
        train_transform=lambda x: x + 100.0, buffer_transform=lambda x: x - 100.0,
        train_target_transform=lambda y: (y + 1) % 3, buffer_target_transform=lambda y: (y + 2) % 3,
    )  # fmt: skip
    updater.update(data())
    raw = data().tensors[0]
    assert len(forwarded) == 2 * ITEMS // BATCH
    for batch in forwarded:
        new, replayed = batch[:BATCH], batch[BATCH:]
        assert bool((new > 50).all()), "the new batch did not go through train_transform"
        assert bool((replayed < -50).all()), "memory items did not go through buffer_transform"
        for row in torch.cat([new - 100.0, replayed + 100.0]):
            assert bool(torch.isclose(raw, row, atol=1e-5).all(1).any()), "an input that is not a raw item + transform"
    assert memory_targets
    for transformed, stored in memory_targets:
        assert torch.equal(transformed, (stored + 2) % 3)


def test_rd_logs_both_phases_and_its_seed_sets_the_fresh_weights() -> None:
    def rd(seed: int, logger: Any = None) -> RepeatedDistillationModelUpdater:
        return RepeatedDistillationModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.0),
                                                memory_size=8, batch_size=BATCH, max_epochs=1, accelerator="cpu",
                                                seed=seed, logger=logger)  # fmt: skip

    recorder = Recorder()
    first = rd(0, recorder).update(data())
    names = {k for metrics, _ in recorder.calls for k in metrics}
    assert {"expert_train_loss", "train_loss"} <= names
    again, other = rd(0).update(data()), rd(1).update(data())
    weights = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_reset_parameters_reinitialises_a_plain_module() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in plain.parameters():
            p.fill_(0.5)
    reset_parameters(plain)
    for p in plain.parameters():
        assert not bool((p.detach() == 0.5).all()) and float(p.detach().std()) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_an_accelerator_that_is_absent_is_refused_not_replaced(accelerator: str) -> None:
    with pytest.raises(RuntimeError, match=f"accelerator='{accelerator}' was asked for, but no CUDA GPU is available"):
        FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), accelerator=accelerator)
    cpu = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), accelerator="cpu")
    assert cpu.device == torch.device("cpu")


def test_a_train_shard_is_the_given_items_in_batches_of_its_size() -> None:
    """``use_train_shard`` (a DDP rank's part of the data): only the items given, in batches of the size given."""
    learner = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=BATCH,
                                     accelerator="cpu").learner  # fmt: skip
    train = data()
    learner.on_model_update_start(train, None)
    learner.use_train_shard(torch.tensor([0, 3, 5]), 2)
    batches = list(learner.train_dataloader())
    assert [len(y) for _, y in batches] == [2, 1]
    got = sorted(tuple(r.tolist()) for x, _ in batches for r in x)
    assert got == sorted(tuple(train.tensors[0][i].tolist()) for i in (0, 3, 5))


class DropoutMLP(MultiLayerPerceptron):
    """An MLP whose features go through dropout in training (draws from the global generator)."""

    def get_features(self, x: Tensor) -> Tensor:
        return nn.functional.dropout(super().get_features(x), 0.5, self.training)


def test_rd_expert_training_is_seeded_whatever_the_global_random_state() -> None:
    """The expert's dropout draws come from the update's seed, not from the caller's global generator."""
    results = []
    for outer_seed in (1, 2):
        torch.manual_seed(0)
        model = DropoutMLP(num_inputs=4, num_outputs=3, hidden_sizes=(16,))
        updater = RepeatedDistillationModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                                                   memory_size=8, batch_size=BATCH, max_epochs=2, accelerator="cpu",
                                                   seed=0)  # fmt: skip
        torch.manual_seed(outer_seed)  # the caller's own draws before the update
        expert = updater.train_expert(data())
        results.append(torch.cat([p.detach().flatten() for p in expert.parameters()]))
    assert torch.equal(results[0], results[1])


def test_the_fit_result_counts_steps_epochs_and_time() -> None:
    updater = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=BATCH,
                                     max_epochs=2, accelerator="cpu")  # fmt: skip
    updater.update(data())
    fit = updater.last_fit
    assert fit is not None and (fit.steps, fit.epochs, fit.stopped_early) == (2 * ITEMS // BATCH, 2, False)
    assert fit.train_seconds > 0


def test_the_fit_summary_is_json_and_rebuilds_the_fit_result() -> None:
    """What a rank process reports back (its FitResult without the optimizer) survives JSON."""
    import json

    from retain.updaters.loop import FitResult

    updater = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=BATCH,
                                     max_epochs=2, accelerator="cpu")  # fmt: skip
    updater.update(data())
    fit = updater.last_fit
    assert fit is not None and fit.optimization is not None
    summary = json.loads(json.dumps(fit.summary()))
    assert set(summary) == {"steps", "epochs", "train_seconds", "stopped_early", "history"}
    rebuilt = FitResult(**summary)
    assert (rebuilt.steps, rebuilt.epochs, rebuilt.history) == (fit.steps, fit.epochs, fit.history)
    assert rebuilt.optimization is None


@pytest.mark.parametrize("progress_bar", [True, False])
def test_the_progress_bar_option_draws_one_bar_per_epoch_on_a_terminal(
    progress_bar: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    FineTuningModelUpdater(
        mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=BATCH, max_epochs=2,
        accelerator="cpu", progress_bar=progress_bar,
    ).update(data())  # fmt: skip
    if progress_bar:
        assert "epoch 1/2" in terminal.text and "epoch 2/2" in terminal.text, terminal.text
        assert f"0/{ITEMS // BATCH} " in terminal.text, "the bar's total is the epoch's batches"
    else:
        assert terminal.text == ""
