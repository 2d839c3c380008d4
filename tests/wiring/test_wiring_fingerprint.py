"""The resume fingerprint covers every input of an update: a checkpoint is reused only by the same update.

``retain.checkpoint.update_fingerprint`` is computed as ``update()`` computes it (the state digest
before the update starts); every input is changed in turn (optimizer, loss, each kind of option,
method options, training and validation data, task id, the input state) and must change the
fingerprint, while a rebuilt identical updater must give the same one. The last test checks the
behaviour the fingerprint exists for: a checkpoint left by another update is not resumed.
The digests it is made of (``data_digest`` of tensor, map-style and streamed datasets,
``callable_digest``, ``without_addresses``) are checked against their documented rules.
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


class MetricsLogger:
    """A logger (callable, so it would count as a callable option if it were not neutral)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def __call__(self) -> None:
        pass


def test_the_same_update_has_the_same_fingerprint(tmp_path: Path, states: tuple[Path, Path]) -> None:
    assert fingerprint(build(tmp_path)) == fingerprint(build(tmp_path))
    assert fingerprint(build(tmp_path, states[0])) == fingerprint(build(tmp_path, states[0]))
    neutral = build(tmp_path, checkpoint_every_n_epochs=1, progress_bar=True, log_every_n_steps=7,
                    logger=MetricsLogger())  # fmt: skip
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


# ------------------------------------------------------------------ the digests the fingerprint is made of
class Items(torch.utils.data.Dataset):
    """A map-style dataset (not tensor-backed): ``noise`` adds a fresh random value to leaf ``b`` per read."""

    def __init__(self, n: int = 40, noise: bool = False, dict_inputs: bool = False, edit: int | None = None,
                 relabel: int | None = None) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = torch.arange(n) % 3
        if edit is not None:
            self.x[edit, 0] += 1.0
        if relabel is not None:
            self.y[relabel] = (self.y[relabel] + 1) % 3
        self.noise, self.dict_inputs = noise, dict_inputs

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        b = self.x[i] + (torch.rand(3) if self.noise else 0.0)
        return ({"a": self.x[i], "b": b} if self.dict_inputs else b), self.y[i]


class OtherItems(Items):
    pass


class Stream(torch.utils.data.IterableDataset):
    """40 items; ``edit``: the item whose first input value is changed."""

    def __init__(self, edit: int | None = None) -> None:
        self.x = torch.arange(120.0).reshape(40, 3)
        if edit is not None:
            self.x[edit, 0] = -1.0

    def __iter__(self) -> Any:
        return iter([(self.x[i], torch.tensor(i % 2)) for i in range(40)])


def dict_collate(items: list[Any]) -> Any:
    return {"x": torch.stack([x for x, _ in items])}, torch.stack([y for _, y in items])


def sampled(n: int) -> list[int]:
    """The items data_digest reads inputs of: its documented seeded subset (generator seed 0)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:32].sort().values.tolist()


def test_a_datasets_digest_sees_its_labels_class_size_and_sampled_inputs() -> None:
    from retain.checkpoint import data_digest

    assert data_digest(None) is None
    base = data_digest(Items())
    assert base is not None and base["items"] == 40 and base["stable_leaves"] == [""]
    assert data_digest(Items()) == base
    inside, outside = sampled(40)[0], next(i for i in range(40) if i not in sampled(40))
    for unread in (i for i in range(40) if i not in sampled(40)):
        assert data_digest(Items(edit=unread)) == base, f"item {unread}, outside the sampled subset, was read"
    assert all(data_digest(Items(edit=i)) != base for i in sampled(40)), "an item of the sampled subset was not read"
    changed = {
        "sampled input": data_digest(Items(edit=inside)),
        "label outside the sample": data_digest(Items(relabel=outside)),
        "class": data_digest(OtherItems()),
        "size": data_digest(Items(n=41)),
    }
    assert base not in changed.values() and len({d["sha256"] for d in changed.values()}) == 4, changed
    assert changed["size"]["items"] == 41


def test_randomly_augmented_leaves_are_left_out_of_the_digest() -> None:
    """A leaf that reads back differently (augmentation) is not hashed, so the same dataset gets
    the same digest; a stable leaf beside it still is."""
    from retain.checkpoint import data_digest

    noisy = data_digest(Items(noise=True))
    assert noisy is not None and noisy["stable_leaves"] == []
    assert data_digest(Items(noise=True)) == noisy
    mixed = data_digest(Items(noise=True, dict_inputs=True))
    assert mixed is not None and mixed["stable_leaves"] == ["a"]
    assert data_digest(Items(noise=True, dict_inputs=True)) == mixed
    inside = sampled(40)[0]
    assert data_digest(Items(noise=True, dict_inputs=True, edit=inside))["sha256"] != mixed["sha256"]


def test_a_streams_digest_reads_its_first_items() -> None:
    from retain.checkpoint import data_digest

    base = data_digest(Stream())
    assert base is not None and base["items"] == 40 and base["stable_leaves"] == [""]
    assert data_digest(Stream()) == base
    for first in (0, 5, 31):
        assert data_digest(Stream(edit=first))["sha256"] != base["sha256"], first
    assert data_digest(Stream(edit=32)) == base, "only the first 32 items of a stream are read"
    collated = data_digest(Stream(), collate_fn=dict_collate)
    assert collated is not None and collated["stable_leaves"] == ["x"] and collated["items"] == 40


def test_a_tensor_datasets_digest_is_the_hash_of_every_value() -> None:
    """Tensor-backed: inputs and targets hashed whole, no sample, no stable_leaves."""
    import hashlib

    from retain.checkpoint import data_digest

    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0])
    h = hashlib.sha256()
    for name, t in (("inputs", x), ("targets", y)):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert data_digest(TensorDataset(x, y)) == {"items": 3, "sha256": h.hexdigest()}


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _add_two(x: torch.Tensor) -> torch.Tensor:
    return x + 2


def _relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


def _scaled(x: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    return x * k


def _scaled_more(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    return x * k


def _renamed(fn: Any, like: Any) -> Any:
    fn.__name__, fn.__qualname__ = like.__name__, like.__qualname__
    return fn


def test_a_callables_digest_sees_its_code_names_and_defaults_but_not_its_address() -> None:
    """Each pair has the same repr (renamed) and differs only in bytecode, a global name it calls,
    or a default; two functions made by the same code at two addresses digest the same."""
    import copy
    import types

    from retain.checkpoint import callable_digest

    def clone(fn: Any) -> Any:
        return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)

    for a, b in ((_double, _add_two), (_relu, _tanh), (_scaled, _scaled_more)):
        b = _renamed(clone(b), a)
        assert repr(a).split(" at ")[0] == repr(b).split(" at ")[0]
        assert callable_digest(a) != callable_digest(b), (a, b)
    twin = clone(_double)
    assert twin is not _double and repr(twin) != repr(_double)  # other address
    assert callable_digest(twin) == callable_digest(_double)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    assert callable_digest(copy.deepcopy(loss)) == callable_digest(loss)
    renamed = _renamed(clone(_add_two), _double)
    assert callable_digest(functools.partial(_double)) != callable_digest(functools.partial(renamed))


def test_private_attributes_of_a_loss_are_left_out_of_its_digest() -> None:
    """Only public scalar settings count: a private cache on the module must not change the digest."""
    from retain.checkpoint import callable_digest

    a, b = torch.nn.CrossEntropyLoss(reduction="none"), torch.nn.CrossEntropyLoss(reduction="none")
    b._cache_hits = 3
    assert callable_digest(a) == callable_digest(b)
    b.margin = None
    c = torch.nn.CrossEntropyLoss(reduction="none")
    c.margin = "x"
    assert callable_digest(b) != callable_digest(c), "a public str/None setting is part of the digest"
    d = torch.nn.CrossEntropyLoss(reduction="none")
    d._cache_hits = 3
    assert callable_digest(b) != callable_digest(d), "a public setting that is None is part of the digest"


def test_without_addresses_removes_every_address() -> None:
    from retain.checkpoint import stable_repr, without_addresses

    assert without_addresses("<f at 0x7fA0> and <g at 0xbeef>") == "<f> and <g>"
    assert without_addresses("at 0x12 stays") == "at 0x12 stays"
    assert stable_repr(_double) == f"<function {_double.__qualname__}>"
