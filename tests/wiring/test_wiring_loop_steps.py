"""The training loop step by step: what it logs and when, clipping by norm, the gradient scaler and
autocast of each precision, validation's mode, early stopping and the best epoch with scripted
validation metrics, resuming after some epochs, the optimizer state round trip, the progress bar's
calls, and the loss bookkeeping (``_LossLog``, ``_fold``) and monitor helpers, checked against
values worked out by hand."""

from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_wiring_loop import ITEMS, data, mlp
from torch import Tensor, nn

import retain.updaters.loop as loop
from retain.learners.base import Learner
from retain.methods import FineTuningModelUpdater
from retain.updaters.loop import (
    FitResult,
    NonFiniteLossError,
    Optimization,
    fit,
    improves,
    monitor_history,
    stops_early,
    validate,
)


def finetune(model: nn.Module | None = None, lr: float = 0.1, **options: Any) -> FineTuningModelUpdater:
    options = {"batch_size": 2, "max_epochs": 2, "accelerator": "cpu", **options}
    return FineTuningModelUpdater(model or mlp(), optimizer=functools.partial(torch.optim.SGD, lr=lr), **options)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Recorder:
    """A logger keeping every ``log_metrics`` call and counting ``save`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int | None]] = []
        self.saves = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def save(self) -> None:
        self.saves += 1


# ------------------------------------------------------------------ logging


def test_the_train_loss_logged_is_each_windows_mean_at_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps per epoch, 2 epochs, log_every_n_steps=4: logs at steps 4 (steps 1-4), 6 (the end of
    epoch 1: steps 5-6), 8 (steps 7-8) and 12 (steps 9-12); the end of epoch 2 has nothing left."""
    losses: list[float] = []
    real_step = Learner.training_step

    def spy(self: Learner, batch: Any, batch_idx: int) -> Tensor:
        loss = real_step(self, batch, batch_idx)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(Learner, "training_step", spy)
    recorder = Recorder()
    finetune(logger=recorder, log_every_n_steps=4).update(data())
    assert len(losses) == 12
    windows = [(4, 0, 4, 0.0), (6, 4, 6, 0.0), (8, 6, 8, 1.0), (12, 8, 12, 1.0)]
    assert [step for _, step in recorder.calls] == [w[0] for w in windows]
    for (metrics, _), (_, start, end, epoch) in zip(recorder.calls, windows, strict=True):
        assert set(metrics) == {"train_loss", "epoch"}
        assert metrics["epoch"] == epoch
        assert metrics["train_loss"] == pytest.approx(sum(losses[start:end]) / (end - start), rel=1e-5)
    assert recorder.saves == 1, "the logger's save() runs once at the end of the fit"


def test_validation_metrics_are_logged_at_the_step_of_each_epoch_end() -> None:
    recorder = Recorder()
    updater = finetune(logger=recorder, log_every_n_steps=50)
    updater.update(data(), data(1))
    val = [(m, s) for m, s in recorder.calls if "val_accuracy" in m]
    assert [s for _, s in val] == [6, 12]
    history = updater.last_fit.history
    assert [m["val_loss"] for m, _ in val] == [h["val_loss"] for h in history]


def test_the_fit_time_is_the_time_the_fit_took() -> None:
    updater = finetune()
    started = time.perf_counter()
    updater.update(data())
    took = time.perf_counter() - started
    assert 0 < updater.last_fit.train_seconds <= took


def test_a_fit_result_starts_empty() -> None:
    first, second = FitResult(), FitResult()
    assert (first.steps, first.epochs, first.train_seconds, first.stopped_early) == (0, 0, 0.0, False)
    assert first.history == [] and first.optimization is None
    first.history.append({"epoch": 0.0})
    assert second.history == [], "two results share one history list"


# ------------------------------------------------------------------ optimisation


def test_gradient_clipping_by_norm_bounds_the_norm_of_every_step() -> None:
    """SGD lr 1, one step, clip norm c: the weights move by a vector of norm exactly c (the
    gradient's norm is far above c)."""
    model = mlp()
    before = flat(model)
    finetune(model, lr=1.0, batch_size=ITEMS, max_epochs=1, gradient_clip_val=1e-3,
             gradient_clip_algorithm="norm").update(data())  # fmt: skip
    assert float((flat(model) - before).norm()) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize(("precision", "scaled"), [("32", False), ("bf16-mixed", False), ("16-mixed", True)])
def test_only_16_mixed_trains_with_a_gradient_scaler(precision: str, scaled: bool) -> None:
    """Several steps with the scaler (its update() between steps) train the model as without one."""
    model = mlp()
    before = flat(model)
    updater = finetune(model, precision=precision)
    updater.update(data())
    optimization = updater.last_fit.optimization
    assert isinstance(optimization.scaler, torch.amp.GradScaler) is scaled
    assert updater.last_fit.steps == 12 and not torch.equal(flat(model), before)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [("32", (False, None)), ("bf16-mixed", (True, torch.bfloat16)), ("16-mixed", (True, torch.float16))],
)
def test_each_precision_trains_and_validates_under_its_autocast(precision: str, expected: tuple) -> None:
    train: set[tuple] = set()
    val: set[tuple] = set()

    def state() -> tuple:
        on = torch.is_autocast_enabled("cpu")
        return (on, torch.get_autocast_dtype("cpu") if on else None)

    model = mlp()
    model.register_forward_hook(lambda m, args, out: (train if m.training else val).add(state()))
    finetune(model, precision=precision).update(data(), data(1))
    assert train == {expected} and expected in val


def test_validate_runs_the_model_in_eval_mode_and_restores_its_mode() -> None:
    updater = finetune()
    learner = updater.learner
    learner.on_model_update_start(data(), data(1))
    modes: list[bool] = []
    learner.model.register_forward_hook(lambda m, args, out: modes.append(m.training))
    for start in (True, False):
        learner.model.train(start)
        modes.clear()
        metrics = validate(learner)
        assert modes and not any(modes) and learner.model.training is start
        assert {"val_loss", "val_accuracy"} <= set(metrics)


def test_a_model_given_in_eval_mode_trains_in_train_mode() -> None:
    model = mlp()
    modes: list[bool] = []
    model.register_forward_hook(lambda m, args, out: modes.append(m.training))
    model.eval()
    finetune(model).update(data())
    assert modes.count(True) == 12


def test_the_optimizer_and_scheduler_state_round_trip_through_optimization() -> None:
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    updater = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                                     batch_size=4, max_epochs=2, accelerator="cpu",
                                     learning_rate_scheduler=scheduler)  # fmt: skip
    updater.update(data())
    state = updater.last_fit.optimization.state_dict()
    assert state["scheduler"]["last_epoch"] == 2
    resumed = Optimization.for_learner(updater.learner, state)
    assert resumed.scheduler.state_dict()["last_epoch"] == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    for new, old in zip(resumed.optimizer.state_dict()["state"].values(), state["optimizer"]["state"].values(),
                        strict=True):  # fmt: skip
        assert torch.equal(new["momentum_buffer"], old["momentum_buffer"])
    assert resumed.optimizer.state_dict()["state"], "the momentum buffers were not restored"
    # a state without a scheduler leaves the fresh scheduler as it starts
    fresh = Optimization.for_learner(updater.learner, {**state, "scheduler": None})
    assert fresh.scheduler.state_dict()["last_epoch"] == 0
    plain = finetune().learner
    assert Optimization.for_learner(plain).state_dict()["scheduler"] is None
    assert Optimization.for_learner(plain).params == list(plain.model.parameters())


# ------------------------------------------------------------------ early stopping and the best epoch


def scripted(monkeypatch: pytest.MonkeyPatch, values: list[float], name: str = "val_loss") -> list[Tensor]:
    """Makes ``validate`` return ``values`` in turn (one per epoch); returns the weights at each call."""
    weights: list[Tensor] = []
    queue = list(values)

    def fake(learner: Learner) -> dict[str, float]:
        weights.append(flat(learner.model))
        return {name: queue.pop(0)}

    monkeypatch.setattr(loop, "validate", fake)
    return weights


@pytest.mark.parametrize("enabled", [True, False])
def test_early_stopping_waits_patience_epochs_and_the_best_epochs_weights_are_served(
    enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """val_loss 3, 2, 2.5, 2.5, 1: with patience 2 training stops after epoch 4 (2 epochs without a
    new best); without early stopping it runs 5 epochs and epoch 5 is the best. The best epoch's
    weights are the model's at the end."""
    weights = scripted(monkeypatch, [3.0, 2.0, 2.5, 2.5, 1.0])
    updater = finetune(max_epochs=5, metric="val_loss", early_stopping_enabled=enabled, patience=2)
    model = updater.update(data(), data(1))
    result = updater.last_fit
    assert (result.epochs, result.stopped_early) == ((4, True) if enabled else (5, False))
    assert [h["val_loss"] for h in result.history] == [3.0, 2.0, 2.5, 2.5, 1.0][: result.epochs]
    best = weights[1] if enabled else weights[4]
    assert torch.equal(flat(model), best)


def test_a_max_metric_keeps_its_highest_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = scripted(monkeypatch, [0.2, 0.9, 0.5], "val_accuracy")
    model = finetune(max_epochs=3, metric="val_accuracy", mode="max").update(data(), data(1))
    assert torch.equal(flat(model), weights[1])


def test_a_monitored_metric_missing_from_the_validation_metrics_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [0.5], "val_accuracy")
    with pytest.raises(ValueError, match=r"'val_loss' is monitored, but the validation metrics are \['val_accuracy'\]"):
        finetune(max_epochs=1, metric="val_loss").update(data(), data(1))


# ------------------------------------------------------------------ resuming after some epochs


def started_learner(**options: Any) -> Learner:
    learner = finetune(**options).learner
    learner.on_model_update_start(data(), data(1) if options.get("metric") else None)
    return learner


def test_a_resumed_fit_continues_its_epochs_and_history_without_restarting() -> None:
    learner = started_learner(max_epochs=3)
    calls: list[int] = []
    learner.on_train_start = lambda: calls.append(1)  # type: ignore[method-assign]
    earlier = [{"epoch": 0.0}, {"epoch": 1.0}]
    result = fit(learner, start_epoch=2, history=earlier)
    assert (result.epochs, result.steps, calls) == (3, 6, [])
    assert result.history == [{"epoch": 0.0}, {"epoch": 1.0}, {"epoch": 2.0}]
    assert earlier == [{"epoch": 0.0}, {"epoch": 1.0}], "the caller's history list was changed"
    done = fit(learner, start_epoch=3, history=result.history)
    assert (done.epochs, done.steps, len(done.history)) == (3, 0, 3)
    assert done.optimization is not None
    fresh = fit(learner, max_epochs=1)
    assert (fresh.epochs, calls) == (1, [1])


def test_a_resume_without_metric_drops_a_stale_best_state() -> None:
    learner = started_learner(max_epochs=3)
    learner.best_state = {f"model.{k}": torch.zeros_like(v) for k, v in learner.model.state_dict().items()}
    fit(learner, start_epoch=2, history=[{"epoch": 0.0}, {"epoch": 1.0}])
    assert learner.best_state is None and float(flat(learner.model).abs().sum()) > 0


@pytest.mark.parametrize("start_epoch", [1, 2])
def test_a_resume_with_metric_keeps_the_best_state_it_carries(
    start_epoch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resumed history's best (val_loss 1.0, epoch 0) is not beaten by the epochs left (5.0):
    the weights carried in ``best_state`` are restored."""
    learner = started_learner(max_epochs=3, metric="val_loss")
    learner.best_state = {f"model.{k}": torch.zeros_like(v) for k, v in learner.model.state_dict().items()}
    scripted(monkeypatch, [5.0, 5.0])
    earlier = [{"epoch": 0.0, "val_loss": 1.0}, {"epoch": 1.0, "val_loss": 2.0}][:start_epoch]
    result = fit(learner, start_epoch=start_epoch, history=earlier)
    assert result.epochs == 3 and len(result.history) == 3
    assert float(flat(learner.model).abs().sum()) == 0.0


# ------------------------------------------------------------------ the progress bar


class FakeBar:
    bars: list[FakeBar] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.updates, self.postfixes, self.closed = kwargs, [], [], False
        FakeBar.bars.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfixes.append(kwargs)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("progress_bar", [True, False])
def test_each_epoch_draws_one_transient_bar_of_its_batches(progress_bar: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeBar.bars = []
    monkeypatch.setattr(loop, "tqdm", FakeBar)
    finetune(progress_bar=progress_bar, log_every_n_steps=3).update(data())
    assert len(FakeBar.bars) == 2
    for epoch, bar in enumerate(FakeBar.bars, start=1):
        assert bar.kwargs == {
            "total": 6, "desc": f"FineTuningModelUpdater task default_task epoch {epoch}/2",
            "disable": None if progress_bar else True, "leave": False, "dynamic_ncols": True,
        }  # fmt: skip
        assert bar.updates == [1] * 6 and bar.closed
        assert [set(p) for p in bar.postfixes] == [{"loss", "refresh"}] * 2
        assert all(p["refresh"] is False and re_float(p["loss"]) for p in bar.postfixes)


def re_float(text: str) -> bool:
    """A loss shown with four decimals."""
    whole, _, decimals = text.partition(".")
    return whole.isdigit() and len(decimals) == 4 and decimals.isdigit()


# ------------------------------------------------------------------ the helpers


def test_improves_is_strictly_better_in_its_mode() -> None:
    assert improves(5.0, None, "min") and improves(5.0, None, "max")
    assert improves(1.0, 2.0, "min") and not improves(2.0, 2.0, "min") and not improves(3.0, 2.0, "min")
    assert improves(3.0, 2.0, "max") and not improves(2.0, 2.0, "max") and not improves(1.0, 2.0, "max")


def test_monitor_history_gives_the_best_value_and_the_epochs_since() -> None:
    options = SimpleNamespace(metric="val_loss", mode="min")
    history = [{"val_loss": 3.0}, {"val_loss": 2.0}, {"epoch": 2.0}, {"val_loss": 2.5}, {"val_loss": 2.0}]
    assert monitor_history(options, history) == (2.0, 2)
    assert monitor_history(options, history[:2]) == (2.0, 0)
    assert monitor_history(SimpleNamespace(metric=None, mode="min"), history) == (None, 0)
    assert monitor_history(SimpleNamespace(metric="val_loss", mode="max"), history) == (3.0, 3)


def test_stops_early_after_patience_epochs_without_improvement_only() -> None:
    history = [{"val_loss": 1.0}, {"val_loss": 2.0}, {"val_loss": 2.0}]

    def options(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**{"metric": "val_loss", "mode": "min", "early_stopping_enabled": True,
                                  "patience": 2, **kw})  # fmt: skip

    assert stops_early(options(), history) is True
    assert stops_early(options(patience=3), history) is False
    assert stops_early(options(), history[:2]) is False
    assert stops_early(options(early_stopping_enabled=False), history) is False
    assert stops_early(options(metric=None), history) is False
    assert stops_early(options(patience=0), []) is False


def loss_log() -> loop._LossLog:
    learner = SimpleNamespace(global_step=0, device=torch.device("cpu"), options=SimpleNamespace(logger=None))
    return loop._LossLog(learner)  # type: ignore[arg-type]


def test_the_loss_log_adds_up_at_most_256_pending_losses() -> None:
    log = loss_log()
    for i in range(255):
        log.learner.global_step = i
        log.add(torch.tensor(1.0))
    assert len(log.pending) == 255 and float(log.loss_sum) == 0.0
    log.add(torch.tensor(1.0))
    assert log.pending == [] and float(log.loss_sum) == 256.0
    log.add(torch.tensor(4.0))
    assert log.window == 257
    assert log.log(0) == pytest.approx(260.0 / 257)
    assert (log.window, float(log.loss_sum), log.pending) == (0, 0.0, [])
    log.add(torch.tensor(3.0))
    log.add(torch.tensor(5.0))
    assert log.log(1) == 4.0


def test_fold_names_the_first_non_finite_step_or_the_overflowing_sum() -> None:
    pending = [(7, torch.tensor(1.0)), (8, torch.tensor(math.nan)), (9, torch.tensor(math.inf))]
    with pytest.raises(NonFiniteLossError, match=r"became non-finite at step 8 \(counted over all updates\)"):
        loop._fold(pending, torch.zeros(()))
    first = [(3, torch.tensor(math.inf)), (4, torch.tensor(1.0))]
    with pytest.raises(NonFiniteLossError, match="at step 3 "):
        loop._fold(first, torch.zeros(()))
    big = [(1, torch.tensor(3e38)), (2, torch.tensor(3e38))]
    with pytest.raises(NonFiniteLossError, match=r"^the training loss sum became non-finite$"):
        loop._fold(big, torch.zeros(()))
    fine = [(1, torch.tensor(1.5)), (2, torch.tensor(2.0))]
    total = torch.zeros(())
    assert loop._fold(fine, total) == 3.5 and fine == [] and float(total) == 3.5


class UsedOnce(nn.Module):
    """A plain module whose ``extra`` bias takes part in its first training forward only."""

    num_outputs = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.extra = nn.Parameter(torch.zeros(3))
        self.training_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        if self.training:
            self.training_calls += 1
            if self.training_calls == 1:
                out = out + self.extra
        return out


def test_a_parameter_without_a_gradient_in_a_step_is_not_stepped() -> None:
    """Gradients are reset to None, not to zero, before each step: a parameter used in the first
    step only moves once, so momentum (which would keep moving a zero-gradient parameter) changes
    nothing for it."""
    moved = []
    for momentum in (0.0, 0.9):
        model = UsedOnce()
        FineTuningModelUpdater(model, optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=momentum),
                               batch_size=4, max_epochs=1, accelerator="cpu").update(data())  # fmt: skip
        assert model.training_calls == 3
        moved.append(model.extra.detach().clone())
    assert float(moved[0].abs().sum()) > 0, "the first step did not move the parameter"
    assert torch.equal(moved[0], moved[1])


def test_the_batch_end_hook_gets_the_steps_loss_batch_and_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_train_batch_end(outputs, batch, batch_idx)``, the hook a learner subclass overrides, gets
    the step's loss, the batch training_step got, and the batch's index within the epoch."""
    steps: list[tuple[Tensor, Any, int]] = []
    ends: list[tuple[Tensor, Any, int]] = []
    real_step, real_end = Learner.training_step, Learner.on_train_batch_end

    def spy_step(self: Learner, batch: Any, batch_idx: int) -> Tensor:
        loss = real_step(self, batch, batch_idx)
        steps.append((loss, batch, batch_idx))
        return loss

    def spy_end(self: Learner, outputs: Tensor, batch: Any, batch_idx: int) -> None:
        ends.append((outputs, batch, batch_idx))
        real_end(self, outputs, batch, batch_idx)

    monkeypatch.setattr(Learner, "training_step", spy_step)
    monkeypatch.setattr(Learner, "on_train_batch_end", spy_end)
    finetune().update(data())
    assert [i for _, _, i in ends] == [0, 1, 2, 3, 4, 5] * 2
    for (loss, batch, _), (outputs, got, _) in zip(steps, ends, strict=True):
        assert outputs is loss and got is batch
