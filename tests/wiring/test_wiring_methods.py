"""Every option of every ER-family method reaches the component it names, and every component runs.

The formulas of the components are pinned by hand-computed values elsewhere (tests/er); these tests
pin the wiring, through real updates of the public updaters: each option gets a distinct
non-default value (so an option passed to the wrong parameter, or swapped with one of equal
default, changes an observable value), spies on the component classes' ``loss`` record which
components run on each step with which weight, and the step's loss is checked to be exactly the
weighted sum the method documents.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.learners import components as comp
from retain.learners.base import Learner
from retain.methods import (
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    PooledOutputDistillationExperienceReplayModelUpdater,
    SuperExperienceReplayModelUpdater,
)

CUSTOM, MSE, POD, CLS = (
    comp.WeightedCustomLossComponent,
    comp.WeightedMeanSquaredErrorLossComponent,
    comp.WeightedPooledOutputDistillationLossComponent,
    comp.WeightedCLSLossComponent,
)

# method -> (updater, its options with distinct non-default values, {component class: expected weight})
METHODS: dict[str, tuple[type, dict[str, Any], dict[type, float]]] = {
    "er": (ExperienceReplayModelUpdater, {"alpha": 0.37}, {CUSTOM: 0.37}),
    "der": (DarkExperienceReplayModelUpdater, {"alpha": 0.21, "beta": 0.43}, {MSE: 0.21, CUSTOM: 0.43}),
    "pod": (
        PooledOutputDistillationExperienceReplayModelUpdater,
        {"alpha": 0.29, "distillation_type": "width", "normalize": 0},
        {POD: 0.29},
    ),
    "cls": (
        CLSExperienceReplayModelUpdater,
        {
            "alpha": 0.31,
            "beta": 0.17,
            "stable_model_update_weight": 0.5,
            "plastic_model_update_weight": 0.25,
            "stable_model_update_probability": 0.35,
            "plastic_model_update_probability": 0.65,
        },
        {CUSTOM: 0.31, CLS: 0.17},
    ),
    "super": (
        SuperExperienceReplayModelUpdater,
        {
            "der_alpha": 0.21,
            "der_beta": 0.43,
            "sp_shrink_factor": 0.8,
            "sp_sigma": 0.003,
            "cls_alpha": 0.17,
            "cls_stable_model_update_weight": 0.5,
            "cls_plastic_model_update_weight": 0.25,
            "cls_stable_model_update_probability": 0.35,
            "cls_plastic_model_update_probability": 0.65,
            "pod_alpha": 0.29,
            "pod_distillation_type": "height",
            "pod_normalize": 0,
        },
        {MSE: 0.21, CUSTOM: 0.43, CLS: 0.17, POD: 0.29},
    ),
}
ITEMS, BATCH, MEMORY_BATCH, EPOCHS = 24, 6, 4, 2
STEPS = EPOCHS * ITEMS // BATCH


def blobs(seed: int, classes: tuple[int, ...] = (0, 1, 2)) -> TensorDataset:
    """Seeded Gaussian blobs (ITEMS items, 4 features) of ``classes``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.arange(ITEMS) % len(classes)]
    x = torch.randn(ITEMS, 4, generator=g) + 2.0 * y[:, None].float()
    return TensorDataset(x, y)


def mlp(seed: int = 0, hidden: tuple[int, ...] = (8,)) -> MultiLayerPerceptron:
    torch.manual_seed(seed)
    return MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=hidden)


def build(method: str, lr: float = 0.05, model: MultiLayerPerceptron | None = None, **overrides: Any) -> Any:
    updater_class, options, _ = METHODS[method]
    kwargs: dict[str, Any] = dict(
        memory_size=13, batch_size=BATCH, memory_batch_size=MEMORY_BATCH, max_epochs=EPOCHS, accelerator="cpu",
        loss_weight=0.7, loss_normalization=0,
    )  # fmt: skip
    kwargs.update(options)
    kwargs.update(overrides)
    return updater_class(model or mlp(), optimizer=functools.partial(torch.optim.SGD, lr=lr), **kwargs)


def components_of(updater: Any) -> dict[str, comp.Component]:
    """The learner's components by name (the names of the README's method table)."""
    return dict(updater.learner.built_components)


class StepSpy:
    """Records, per training step, the base loss, every component loss (class, weight, value) and the total."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        spy = self
        for cls in (CUSTOM, MSE, POD, CLS):
            real = cls.loss

            def loss(self: comp.Component, *args: Any, _real: Any = real, **kwargs: Any) -> Tensor:
                value = _real(self, *args, **kwargs)
                assert spy._current is not None, "a component loss ran outside a training step"
                spy._current["components"].append((type(self), self.weight, value.detach().clone()))
                batch = args[1] if len(args) > 1 else kwargs["batch_memory"]
                spy._current["batches"].append((type(self), batch))  # kept alive: ids stay unique
                return value

            monkeypatch.setattr(cls, "loss", loss)
        real_base = Learner.base_loss

        def base_loss(self: Learner, outputs: Tensor, targets: Tensor) -> Tensor:
            value = real_base(self, outputs, targets)
            assert spy._current is not None
            spy._current["base"].append(value.detach().clone())
            return value

        monkeypatch.setattr(Learner, "base_loss", base_loss)

    def watch(self, learner: Any) -> None:
        """Wraps ``learner.training_step`` to delimit the steps and keep the loss it returns."""
        real_step = learner.training_step
        real_sample = learner.memory.sample

        def sample(k: int) -> Any:
            batch = real_sample(k)
            if self._current is not None:
                self._current["draws"] += 1
            return batch

        learner.memory.sample = sample

        def training_step(batch: Any, batch_idx: int) -> Tensor:
            self._current = {"base": [], "components": [], "batches": [], "draws": 0, "memory": len(learner.memory)}
            total = real_step(batch, batch_idx)
            self._current["total"] = total.detach().clone()
            self.steps.append(self._current)
            self._current = None
            return total

        learner.training_step = training_step


@pytest.mark.parametrize("normalization", [0, 1])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_loss_component_runs_each_step_with_its_option_weight(
    method: str, normalization: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = METHODS[method][2]
    spy = StepSpy(monkeypatch)
    updater = build(method, loss_normalization=normalization)
    spy.watch(updater.learner)
    updater.update(blobs(0))
    assert len(spy.steps) == STEPS
    assert spy.steps[0]["memory"] == 0 and spy.steps[0]["components"] == []  # empty memory: base loss only
    for i, step in enumerate(spy.steps[1:], start=1):
        called = {cls: weight for cls, weight, _ in step["components"]}
        assert len(step["components"]) == len(expected), (i, step["components"])
        assert called == pytest.approx(expected), i
        (base,) = step["base"]
        numerator = 0.7 * base + sum(value for _, _, value in step["components"])
        denominator = 0.7 + sum(expected.values()) if normalization else 1.0
        torch.testing.assert_close(step["total"], numerator / denominator, rtol=1e-6, atol=1e-7)
    first = spy.steps[0]
    torch.testing.assert_close(first["total"], (0.7 * first["base"][0]) / (0.7 if normalization else 1.0))


# memory draws per step and which components share a batch (the order of the README's table):
# ER 1; DER mse + CE on two batches; POD 1; CLS CE and consistency on one batch; Super mse, CE (+ CLS on
# the CE batch), POD on a third.
DRAWS = {"er": 1, "der": 2, "pod": 1, "cls": 1, "super": 3}
SHARED = {"cls": (CUSTOM, CLS), "super": (CUSTOM, CLS)}


@pytest.mark.parametrize("method", list(METHODS))
def test_memory_batches_per_step_and_the_batch_each_component_sees(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = StepSpy(monkeypatch)
    updater = build(method)
    spy.watch(updater.learner)
    updater.update(blobs(0))
    for step in spy.steps[1:]:
        assert step["draws"] == DRAWS[method]
        batch_of = dict(step["batches"])
        assert len({id(b) for b in batch_of.values()}) == DRAWS[method]
        if method in SHARED:
            first, second = SHARED[method]
            assert batch_of[first] is batch_of[second], "the consistency term must use the CE term's batch"


@pytest.mark.parametrize("method", list(METHODS))
def test_the_users_loss_fn_is_the_replay_cross_entropy(method: str) -> None:
    """The loss_fn given to the updater computes the base loss and every cross-entropy replay term."""
    sizes: list[int] = []
    ce = torch.nn.CrossEntropyLoss(reduction="none")

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        sizes.append(len(targets))
        return ce(outputs, targets)

    updater_class, options, expected = METHODS[method]
    updater = updater_class(
        mlp(), loss_fn, functools.partial(torch.optim.SGD, lr=0.05), memory_size=13, batch_size=BATCH,
        memory_batch_size=MEMORY_BATCH, max_epochs=EPOCHS, accelerator="cpu", **options,
    )  # fmt: skip
    updater.update(blobs(0))
    replay_terms = 1 if CUSTOM in expected else 0
    assert sizes.count(BATCH) == STEPS  # the base loss, every step
    assert sizes.count(MEMORY_BATCH) == replay_terms * (STEPS - 1)  # the memory's CE from the second step on


@pytest.mark.parametrize("method", list(METHODS))
def test_components_carry_the_options_passed(method: str) -> None:
    """Options that no loss weight shows (POD type and normalisation, CLS copies, shrink and perturb)."""
    options = METHODS[method][1]
    c = components_of(build(method))
    prefix = {"super": ("pod_", "cls_", "sp_")}.get(method, ("", "", ""))
    pod_p, cls_p, sp_p = prefix
    if "pod_loss" in c:
        assert c["pod_loss"].distillation_type == options[f"{pod_p}distillation_type"]
        assert c["pod_loss"].normalize is False
    if "cls_loss" in c:
        cls = c["cls_loss"]
        for name in ("stable_model_update_weight", "plastic_model_update_weight",
                     "stable_model_update_probability", "plastic_model_update_probability"):  # fmt: skip
            assert getattr(cls, name) == options[f"{cls_p}{name}"], name
    if "shrink_perturb" in c:
        sp = c["shrink_perturb"]
        assert (sp.shrink_factor, sp.sigma) == (options[f"{sp_p}shrink_factor"], options[f"{sp_p}sigma"])
    names = {"er": {"memory_loss"}, "der": {"mse_loss", "memory_loss"}, "pod": {"pod_loss"},
             "cls": {"memory_loss", "cls_loss"},
             "super": {"mse_loss", "memory_loss", "cls_loss", "pod_loss", "shrink_perturb"}}  # fmt: skip
    assert set(c) == names[method]


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("distillation_type", ["spatial", "width", "channel"])
def test_pod_option_values_reach_the_pod_loss(distillation_type: str, normalize: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The POD term of a step equals ``alpha * pod_loss`` with the type and normalisation passed."""
    seen: list[tuple[str, bool]] = []
    real = comp.pod_loss_pooled  # the step distils against the pooled vectors the memory stores

    def pod_loss_pooled(current: Any, stored: Any, distillation_type: str = "spatial",
                        normalize: bool = True) -> Tensor:  # fmt: skip
        seen.append((distillation_type, bool(normalize)))
        return real(current, stored, distillation_type, normalize)

    monkeypatch.setattr(comp, "pod_loss_pooled", pod_loss_pooled)
    updater = build("pod", distillation_type=distillation_type, normalize=normalize)
    updater.update(blobs(0))
    assert seen and set(seen) == {(distillation_type, bool(normalize))}


def _params(model: torch.nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_shrink_and_perturb_runs_once_at_each_update_start_with_its_factor() -> None:
    """With lr=0 the only change to the working weights is shrink-and-perturb: ``0.5 * w`` (sigma 0)
    after an update of two epochs, ``0.25 * w`` after a second update (once per update, not per epoch)."""
    model = mlp()
    initial = _params(model)
    updater = build("super", lr=0.0, model=model, sp_shrink_factor=0.5, sp_sigma=0.0)
    updater.update(blobs(0))
    for p, w in zip(updater.learner.model.parameters(), initial, strict=True):
        torch.testing.assert_close(p.detach(), 0.5 * w, rtol=0, atol=0)
    updater.update(blobs(1))
    for p, w in zip(updater.learner.model.parameters(), initial, strict=True):
        torch.testing.assert_close(p.detach(), 0.25 * w, rtol=0, atol=0)


def test_shrink_and_perturb_adds_noise_of_scale_sigma() -> None:
    """Shrink factor 1 and lr=0: the change is the noise alone, a seeded draw whose spread is sigma
    (not 1, not 0), the same for the same seed and different for another seed."""
    deltas = []
    for seed in (0, 0, 1):
        model = mlp(hidden=(64,))
        initial = _params(model)
        updater = build("super", lr=0.0, model=model, sp_shrink_factor=1.0, sp_sigma=0.25, seed=seed)
        updater.update(blobs(0))
        deltas.append(torch.cat([(p.detach() - w).flatten() for p, w in zip(model.parameters(), initial, strict=True)]))
    assert torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[0], deltas[2])
    assert 0.22 < float(deltas[0].std()) < 0.28 and abs(float(deltas[0].mean())) < 0.03


@pytest.mark.parametrize("method", ["cls", "super"])
@pytest.mark.parametrize("follower", ["plastic", "stable"])
def test_cls_copies_follow_their_own_probability_and_weight(method: str, follower: str) -> None:
    """One copy updates at every step with EMA weight 0 (it equals the working model after the
    update), the other never (it keeps the initial weights): a swapped probability or weight shows.
    The update serves the stable copy."""
    other = "stable" if follower == "plastic" else "plastic"
    p = "cls_" if method == "super" else ""
    options = {
        f"{p}{follower}_model_update_probability": 1.0, f"{p}{follower}_model_update_weight": 0.0,
        f"{p}{other}_model_update_probability": 0.0, f"{p}{other}_model_update_weight": 0.5,
    }  # fmt: skip
    if method == "super":
        options.update(sp_shrink_factor=1.0, sp_sigma=0.0)
    model = mlp()
    initial = _params(model)
    updater = build(method, model=model, **options)
    served = updater.update(blobs(0))
    working = _params(updater.learner.model)
    assert any(not torch.equal(a, b) for a, b in zip(working, initial, strict=True)), "the update did not train"
    cls = components_of(updater)["cls_loss"]
    copies = {"plastic": cls.plastic_model, "stable": cls.stable_model}
    for a, b in zip(copies[follower].parameters(), working, strict=True):
        assert torch.equal(a.detach(), b)
    for a, b in zip(copies[other].parameters(), initial, strict=True):
        assert torch.equal(a.detach(), b)
    assert served is cls.stable_model
    expected = working if follower == "stable" else initial
    for a, b in zip(served.parameters(), expected, strict=True):
        assert torch.equal(a.detach(), b)


def test_replay_options_reach_the_learner_and_the_memory() -> None:
    """memory_size, memory_batch_size / batch_memory_frac, loss_weight, gamma and normalisation."""
    updater = build("der", memory_size=11, ema_memory_update_gamma=0.6, loss_normalization=1, loss_weight=0.4)
    learner = updater.learner
    assert learner.memory.memory_size == 11
    assert (learner.train_batch_size, learner.memory_batch_size) == (BATCH, MEMORY_BATCH)
    assert (learner.loss_weight, learner.ema_memory_update_gamma, learner.loss_normalization) == (0.4, 0.6, 1)
    split = build("der", memory_batch_size=None, batch_memory_frac=0.25, batch_size=8).learner
    assert (split.train_batch_size, split.memory_batch_size) == (6, 2)
    updater.update(blobs(0))
    assert len(learner.memory) == 11 and learner.memory.seen == ITEMS * EPOCHS


@pytest.mark.parametrize(
    ("method", "options"),
    [("er", {"memory_batch_size": 0}), ("er", {"alpha": 0.0}), ("der", {"alpha": 0.0, "beta": 0.0}),
     ("pod", {"alpha": 0.0})],
    ids=["er-no-memory-batch", "er-alpha-0", "der-weights-0", "pod-alpha-0"],
)
def test_replay_without_a_memory_term_trains_exactly_as_fine_tuning(method: str, options: dict[str, Any]) -> None:
    """No memory batch, or every loss weight 0: no replay term, no extra forward and no memory draw,
    so the weights are bit-identical to fine-tuning's on the same data, seed and batches, and the
    memory holds the same reservoir as one that is never sampled (a draw would move its generator)."""
    from retain.methods import FineTuningModelUpdater

    data = blobs(0)
    replay = build(method, loss_weight=1.0, **options)
    replayed = replay.update(data)
    tuned = FineTuningModelUpdater(mlp(), optimizer=functools.partial(torch.optim.SGD, lr=0.05), batch_size=BATCH,
                                   max_epochs=EPOCHS, accelerator="cpu").update(data)  # fmt: skip
    for a, b in zip(replayed.parameters(), tuned.parameters(), strict=True):
        assert torch.equal(a, b)
    reference = build("er", memory_batch_size=0)
    reference.update(data)
    assert reference.learner.memory_batch_size == 0
    kept, expected = replay.learner.memory.raw_items(), reference.learner.memory.raw_items()
    assert torch.equal(kept[0], expected[0]) and torch.equal(kept[1], expected[1])
