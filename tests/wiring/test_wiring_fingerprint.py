"""The resume fingerprint covers every input of an update: a checkpoint is reused only by the same update.

``retain.checkpoint.update_fingerprint`` is computed as ``update()`` computes it (the state digest
before the update starts); every input is changed in turn (optimizer, loss, each kind of option,
method options, training and validation data, task id, the input state) and must change the
fingerprint, while a rebuilt identical updater must give the same one. The last test checks the
behaviour the fingerprint exists for: a checkpoint left by another update is not resumed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from retain import MultiLayerPerceptron
from retain.checkpoint import resume_folder, state_digest, update_fingerprint
from retain.methods import DarkExperienceReplayModelUpdater


def data(seed: int = 0, n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def scale(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1


BASE: dict[str, Any] = dict(memory_size=8, batch_size=4, max_epochs=2, accelerator="cpu", alpha=0.3, beta=0.5,
                            seed=0, train_transform=scale)  # fmt: skip


def build(tmp_path: Path, input_state: Path | None = None, optimizer: Any = None, loss_fn: Any = None,
          **changes: Any) -> DarkExperienceReplayModelUpdater:  # fmt: skip
    torch.manual_seed(0)
    updater = DarkExperienceReplayModelUpdater(
        MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)), loss_fn,
        optimizer or functools.partial(torch.optim.SGD, lr=0.1), input_state_folder=input_state,
        output_state_folder=tmp_path / "out", **{**BASE, **changes},
    )  # fmt: skip
    updater.release_output_lock()  # several are compared side by side; update() takes the lock again
    return updater


def fingerprint(updater: Any, train: TensorDataset | None = None, val: TensorDataset | None = None,
                task_id: str | None = None) -> str:  # fmt: skip
    return update_fingerprint(updater, state_digest(updater), train or data(), val, None, None, task_id)


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two input states: the same update with two seeds."""
    root = tmp_path_factory.mktemp("inputs")
    for seed in (0, 1):
        torch.manual_seed(0)
        DarkExperienceReplayModelUpdater(
            MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=(8,)),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), output_state_folder=root / f"s{seed}",
            **{**BASE, "seed": seed},
        ).update(data(5))  # fmt: skip
    return root / "s0", root / "s1"


CHANGES: dict[str, dict[str, Any]] = {
    "optimizer lr": {"optimizer": functools.partial(torch.optim.SGD, lr=0.2)},
    "optimizer class": {"optimizer": functools.partial(torch.optim.Adam, lr=0.1)},
    "loss": {"loss_fn": torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)},
    "batch_size": {"batch_size": 5},
    "max_epochs": {"max_epochs": 3},
    "seed": {"seed": 1},
    "train_transform": {"train_transform": shift},
    "test_transform": {"test_transform": shift},
    "precision": {"precision": "64"},
    "mask_unused_classes": {"mask_unused_classes": True},
    "gradient_clip_val": {"gradient_clip_val": 1.0},
    "scheduler": {"learning_rate_scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)},
    "alpha": {"alpha": 0.4},
    "beta": {"beta": 0.6},
    "memory_size": {"memory_size": 9},
    "memory_batch_size": {"memory_batch_size": 3},
    "loss_weight": {"loss_weight": 0.9},
    "loss_normalization": {"loss_normalization": 0},
    "ema gamma": {"ema_memory_update_gamma": 0.5},
}


def test_the_same_update_has_the_same_fingerprint(tmp_path: Path, states: tuple[Path, Path]) -> None:
    assert fingerprint(build(tmp_path)) == fingerprint(build(tmp_path))
    assert fingerprint(build(tmp_path, states[0])) == fingerprint(build(tmp_path, states[0]))
    neutral = build(tmp_path, checkpoint_every_n_epochs=1, progress_bar=True, log_every_n_steps=7)
    assert fingerprint(neutral) == fingerprint(build(tmp_path)), "options that change no result changed it"


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_option_and_the_optimizer_change_the_fingerprint(change: str, tmp_path: Path) -> None:
    assert fingerprint(build(tmp_path, **CHANGES[change])) != fingerprint(build(tmp_path))


def test_data_task_id_and_input_state_change_the_fingerprint(tmp_path: Path, states: tuple[Path, Path]) -> None:
    base = fingerprint(build(tmp_path))
    edited = data()
    edited.tensors[0][3, 2] += 1e-3  # one value of one item
    relabelled = data()
    relabelled.tensors[1][0] = (relabelled.tensors[1][0] + 1) % 3
    others = {
        "train data": fingerprint(build(tmp_path), train=data(1)),
        "one input value": fingerprint(build(tmp_path), train=edited),
        "one label": fingerprint(build(tmp_path), train=relabelled),
        "one item fewer": fingerprint(build(tmp_path), train=data(0, n=15)),
        "val data": fingerprint(build(tmp_path), val=data(2)),
        "other val data": fingerprint(build(tmp_path), val=data(3)),
        "task id": fingerprint(build(tmp_path), task_id="t1"),
        "input state": fingerprint(build(tmp_path, states[0])),
        "other input state": fingerprint(build(tmp_path, states[1])),
    }
    assert base not in others.values()
    assert len(set(others.values())) == len(others), others


def stacking_collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*items, strict=True)
    return torch.stack(inputs), torch.stack(targets)


OTHER_UPDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (build changes, update arguments)
    "learning rate": ({"optimizer": functools.partial(torch.optim.SGD, lr=0.2)}, {}),
    "task id": ({}, {"task_id": "t1"}),
    "validation collate": ({}, {"val_dataset_collate_fn": stacking_collate}),
}


@pytest.mark.parametrize("change", list(OTHER_UPDATES))
def test_a_checkpoint_of_another_update_is_not_resumed(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update stopped after its first checkpointed epoch leaves a checkpoint; an update that differs
    in one input (given to ``update()`` itself) ignores it with a warning and starts over, the same
    update resumes it."""
    import retain.checkpoint as checkpoint

    class StopError(Exception):
        pass

    real_end = checkpoint.ResumeCheckpointer.on_epoch_end
    arguments = {"val_dataset": data(seed=5)}

    def leave_checkpoint() -> None:
        def end_then_stop(self: Any, epoch: int, result: Any) -> None:
            real_end(self, epoch, result)
            raise StopError("stopped after the first checkpoint")

        monkeypatch.setattr(checkpoint.ResumeCheckpointer, "on_epoch_end", end_then_stop)
        with pytest.raises(StopError, match="stopped after the first checkpoint"):
            build(tmp_path, checkpoint_every_n_epochs=1).update(data(), **arguments)
        monkeypatch.setattr(checkpoint.ResumeCheckpointer, "on_epoch_end", real_end)
        assert resume_folder(tmp_path / "out").is_dir()

    leave_checkpoint()
    changes, other_arguments = OTHER_UPDATES[change]
    other = build(tmp_path, checkpoint_every_n_epochs=1, **changes)
    with pytest.warns(UserWarning, match="belongs to a different update"):
        other.update(data(), **{**arguments, **other_arguments})
    assert other.resumed_from_epoch == 0 and not resume_folder(tmp_path / "out").exists()
    leave_checkpoint()
    same = build(tmp_path, checkpoint_every_n_epochs=1)
    same.update(data(), **arguments)
    assert same.resumed_from_epoch == 1 and not resume_folder(tmp_path / "out").exists()


def test_settings_hidden_from_a_callables_repr_change_the_fingerprint(tmp_path: Path) -> None:
    """A loss's reduction or class weights, an optimizer function's learning rate, a transform's body."""

    def optimizer_a(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.05)

    def optimizer_b(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.5)

    optimizer_b.__name__ = optimizer_b.__qualname__ = optimizer_a.__qualname__  # the same repr
    assert repr(optimizer_a).split(" at ")[0] == repr(optimizer_b).split(" at ")[0]
    assert fingerprint(build(tmp_path, optimizer=optimizer_a)) != fingerprint(build(tmp_path, optimizer=optimizer_b))
    ce = torch.nn.CrossEntropyLoss
    losses = [ce(reduction="none"), ce(reduction="none", label_smoothing=0.2),
              ce(reduction="none", weight=torch.tensor([1.0, 2.0, 3.0]))]  # fmt: skip
    assert len({repr(loss) for loss in losses}) == 1
    assert len({fingerprint(build(tmp_path, loss_fn=loss)) for loss in losses}) == 3

    def transform_a(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def transform_b(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    transform_b.__qualname__ = transform_a.__qualname__
    assert fingerprint(build(tmp_path, train_transform=transform_a)) != fingerprint(
        build(tmp_path, train_transform=transform_b)
    )


def test_a_partials_function_is_seen_through_the_partial(tmp_path: Path) -> None:
    """``functools.partial(f, lr=...)`` of two functions with the same name (and so the same repr)
    but different bodies: the digest looks into the partial's function."""

    def make_a(params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)

    def make_b(params: Any, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    make_b.__name__ = make_b.__qualname__ = make_a.__qualname__
    a, b = functools.partial(make_a, lr=0.1), functools.partial(make_b, lr=0.1)
    assert repr(a).split(" at ")[0] == repr(b).split(" at ")[0]
    assert fingerprint(build(tmp_path, optimizer=a)) != fingerprint(build(tmp_path, optimizer=b))
