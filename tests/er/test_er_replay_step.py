"""The ER-family learner's step and construction at their edges: the learners' own signatures and
help, the seeds of the components' generators, steps without replay (weight 0, memory batch 0),
loss weights other than 1, one EMA refresh per drawn batch, the memory columns of each method,
the range of ``ema_memory_update_gamma``, the strict loading of CLS-ER's working model, and
``join_batches`` (one forward pass over new and replayed items of other dtypes and lengths)."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_er_learner_base import blobs
from test_er_learners import mlp
from torch import Tensor
from torch.utils.data import TensorDataset

from retain.learners.base import new_checkpoint
from retain.memory import MemoryBatch
from retain.methods.er import (
    CLSExperienceReplayLearner,
    DarkExperienceReplayLearner,
    ExperienceReplayLearner,
    PooledOutputDistillationExperienceReplayLearner,
    SuperExperienceReplayLearner,
    join_batches,
)

SGD = functools.partial(torch.optim.SGD, lr=0.1)


def run_update(learner: Any, data: TensorDataset, step_hook: Any = None) -> None:
    """Drives one update through the learner's hooks, as the training loop does."""
    learner.on_model_update_start(data, None)
    optimizer, _ = learner.configure_optimizers()
    learner.on_train_start()
    for i, batch in enumerate(learner.train_dataloader()):
        loss = learner.training_step(batch, i)
        if step_hook is not None:
            step_hook(i, batch, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.on_train_batch_end(loss, batch, i)
    learner.on_train_end()
    learner.on_model_update_end()


def count_draws(learner: Any) -> list[int]:
    draws = [0]
    sample = learner.memory.sample

    def counting(k: int) -> MemoryBatch | None:
        draws[0] += 1
        return sample(k)

    learner.memory.sample = counting
    return draws


# ------------------------------------------------------------------ the learners' signatures
def test_a_learners_method_options_come_first_and_its_base_options_by_name() -> None:
    params = inspect.signature(CLSExperienceReplayLearner).parameters
    kinds = {name: p.kind for name, p in params.items()}
    assert list(params)[:3] == ["alpha", "beta", "stable_model_update_weight"]
    assert all(kinds[name] is inspect.Parameter.POSITIONAL_OR_KEYWORD for name in list(params)[:6])
    for name in ("loss_weight", "ema_memory_update_gamma", "loss_normalization"):
        assert kinds[name] is inspect.Parameter.KEYWORD_ONLY, name
    assert kinds["kwargs"] is inspect.Parameter.VAR_KEYWORD and "model" not in params
    assert params["beta"].default == 0.1
    doc = inspect.getdoc(ExperienceReplayLearner.__init__) or ""
    assert "alpha: weight of the cross-entropy on replayed memory items (>= 0)" in doc
    assert "loss_weight: weight of the loss on the new data (>= 0)" in doc
    learner = ExperienceReplayLearner(0.25, model=mlp(), optimizer=SGD, memory_size=5)
    assert learner.built_components["memory_loss"].weight == 0.25


def test_component_generators_are_seeded_from_the_learners_seed_and_position() -> None:
    """A component's generator is seeded with ``seed + 100 + its position``, as in earlier releases
    (so a seeded CLS-ER or Super-ER draws the same copy updates and noise release after release)."""
    cls = CLSExperienceReplayLearner(model=mlp(), optimizer=SGD, memory_size=5, seed=5)
    assert cls.built_components["cls_loss"].generator.initial_seed() == 106  # memory_loss is position 0
    sup = SuperExperienceReplayLearner(model=mlp(hidden=(8, 6)), optimizer=SGD, memory_size=5, seed=5)
    assert sup.built_components["cls_loss"].generator.initial_seed() == 107
    assert sup.built_components["shrink_perturb"].generator.initial_seed() == 108


# ------------------------------------------------------------------ steps without replay
def test_a_replay_weight_of_zero_draws_nothing_and_trains_on_the_new_data_alone() -> None:
    model = mlp()
    learner = ExperienceReplayLearner(model=model, optimizer=SGD, memory_size=20, alpha=0.0, batch_size=8,
                                      memory_batch_size=4, loss_normalization=1, seed=0)  # fmt: skip
    draws = count_draws(learner)

    def check(i: int, batch: Any, loss: Tensor) -> None:
        with torch.no_grad():
            expected = F.cross_entropy(model(batch[0]), batch[1])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    run_update(learner, blobs(16, seed=1), check)
    run_update(learner, blobs(16, seed=2), check)
    assert len(learner.memory) == 20 and draws == [0]


def test_a_memory_batch_of_zero_replays_nothing() -> None:
    model = mlp()
    learner = DarkExperienceReplayLearner(model=model, optimizer=SGD, memory_size=20, batch_size=8,
                                          memory_batch_size=0, seed=0)  # fmt: skip
    draws = count_draws(learner)
    forwards = [0]
    model.register_forward_hook(lambda m, args, out: forwards.__setitem__(0, forwards[0] + out.shape[0] * m.training))
    run_update(learner, blobs(16, seed=1))
    run_update(learner, blobs(16, seed=2))
    assert draws == [0] and forwards[0] == 32  # only the new items went through the model in training


def test_a_loss_weight_of_two_doubles_the_new_data_term() -> None:
    model = mlp()
    learner = ExperienceReplayLearner(model=model, optimizer=SGD, memory_size=20, batch_size=8, memory_batch_size=4,
                                      loss_weight=2.0, loss_normalization=0, seed=0)  # fmt: skip
    learner.on_model_update_start(blobs(8, seed=1), None)
    x, y = next(iter(learner.train_dataloader()))
    loss = learner.training_step((x, y), 0)  # empty memory: the new-data term alone, not normalised
    with torch.no_grad():
        expected = 2.0 * F.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------ EMA refresh per drawn batch
def test_each_drawn_memory_batch_is_refreshed_once_per_step() -> None:
    """Super-ER draws three batches per step (MSE, CE with the CLS term on the same batch, POD): the
    EMA refreshes three batches, not the shared one twice."""
    learner = SuperExperienceReplayLearner(
        model=mlp(hidden=(8, 6)), optimizer=SGD, memory_size=40, batch_size=8, memory_batch_size=4, seed=0,
        ema_memory_update_gamma=0.5,
    )  # fmt: skip
    run_update(learner, blobs(16, seed=1))
    refreshed: list[int] = []
    real = learner._refresh_metadata

    def refresh(indices: Tensor, logits: Tensor, features: list[Tensor]) -> None:
        refreshed.append(int(indices.shape[0]))
        real(indices, logits, features)

    learner._refresh_metadata = refresh
    draws = count_draws(learner)
    run_update(learner, blobs(16, seed=2))
    assert draws == [6] and refreshed == [4] * 6  # 2 steps x 3 batches


# ------------------------------------------------------------------ memory columns per method
@pytest.mark.parametrize(
    ("learner_class", "columns"),
    [
        (ExperienceReplayLearner, {}),
        (DarkExperienceReplayLearner, {"logits": (3,)}),
        (PooledOutputDistillationExperienceReplayLearner, {"pod_spatial_0": (8,)}),
        (CLSExperienceReplayLearner, {}),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_each_method_stores_and_requires_only_its_own_memory_columns(learner_class: type, columns: dict) -> None:
    learner = learner_class(model=mlp(), optimizer=SGD, memory_size=20, batch_size=8, memory_batch_size=4, seed=0)
    run_update(learner, blobs(16, seed=1))
    stored = {name: tuple(value.shape[1:]) for name, value in learner.memory.raw_items()[2].items()}
    assert stored == columns
    required = learner.required_memory_metadata()
    if learner_class is PooledOutputDistillationExperienceReplayLearner:
        assert required == {"pod_spatial_0": None}  # its layer count shows in a forward pass
    else:
        assert required == columns


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5])
def test_ema_gamma_outside_0_1_is_refused(gamma: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ema_memory_update_gamma must lie in (0, 1], got {gamma!r}")):
        DarkExperienceReplayLearner(model=mlp(), optimizer=SGD, memory_size=5, ema_memory_update_gamma=gamma)
    assert DarkExperienceReplayLearner(model=mlp(), optimizer=SGD, memory_size=5,
                                       ema_memory_update_gamma=1.0).ema_memory_update_gamma == 1.0  # fmt: skip


def test_cls_er_loads_its_working_model_strictly() -> None:
    learner = CLSExperienceReplayLearner(model=mlp(), optimizer=SGD, memory_size=5, seed=0)
    checkpoint = new_checkpoint()
    learner.on_save_checkpoint(checkpoint)
    assert "working_model.heads.default_task.weight" in checkpoint["tensors"]
    del checkpoint["tensors"]["working_model.heads.default_task.bias"]
    other = CLSExperienceReplayLearner(model=mlp(1), optimizer=SGD, memory_size=5, seed=0)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"heads.default_task.bias\""):
        other.on_load_checkpoint(checkpoint)


# ------------------------------------------------------------------ join_batches
def test_join_batches_casts_the_replayed_batch_to_the_new_dtype() -> None:
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    replayed = torch.tensor([[5.0, 6.0]], dtype=torch.float64)
    joined = join_batches(new, replayed)
    assert joined.dtype == torch.float32 and joined.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def test_join_batches_pads_tensors_of_other_lengths_with_the_pad_value() -> None:
    new = torch.tensor([[1, 2, 3]])
    replayed = torch.tensor([[4, 5, 6, 8, 9], [1, 1, 1, 1, 1]], dtype=torch.int32)
    joined = join_batches(new, replayed, {"": 7})
    assert joined.dtype == torch.int64
    assert joined.tolist() == [[1, 2, 3, 7, 7], [4, 5, 6, 8, 9], [1, 1, 1, 1, 1]]
    longer_new = join_batches(replayed.long(), new, {"": 7})  # the replayed batch padded to the new length
    assert longer_new.tolist() == [[4, 5, 6, 8, 9], [1, 1, 1, 1, 1], [1, 2, 3, 7, 7]]


def test_join_batches_joins_dict_inputs_leaf_by_leaf() -> None:
    new = {"input_ids": torch.tensor([[3, 4, 5]]), "scale": torch.tensor([[0.5]])}
    replayed = {"input_ids": torch.tensor([[6]]), "scale": torch.tensor([[2.0]], dtype=torch.float64)}
    joined = join_batches(new, replayed, {"input_ids": 7})
    assert joined["input_ids"].tolist() == [[3, 4, 5], [6, 7, 7]]
    assert joined["scale"].dtype == torch.float32 and joined["scale"].tolist() == [[0.5], [2.0]]


class _Tokens(torch.nn.Module):
    """Mean of token embeddings -> 3 logits (a plain module taking (B, L) token ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(40, 4), torch.nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.embed(x).mean(1))


def test_replayed_sequences_are_padded_with_the_declared_pad_value() -> None:
    """Token sequences of length 3, then of length 5: the replayed items of the first update join
    the longer new batch padded with ``pad_values`` (7 here), not with 0."""
    torch.manual_seed(0)
    model = _Tokens()
    seen: list[Tensor] = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()) if m.training else None)
    learner = ExperienceReplayLearner(model=model, optimizer=SGD, memory_size=8, batch_size=4, memory_batch_size=2,
                                      pad_values={"": 7}, seed=0)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    short = TensorDataset(torch.randint(0, 7, (8, 3), generator=g), torch.randint(3, (8,), generator=g))
    long = TensorDataset(torch.randint(0, 7, (4, 5), generator=g), torch.randint(3, (4,), generator=g))
    run_update(learner, short)
    seen.clear()
    run_update(learner, long)
    (joined,) = seen
    assert joined.shape == (6, 5)
    assert sorted(joined[:4].tolist()) == sorted(long.tensors[0].tolist())  # the new batch (shuffled)
    assert joined[4:, 3:].eq(7).all() and joined[4:, :3].lt(7).all()  # replayed short items, padded with 7
