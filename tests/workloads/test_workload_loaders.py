"""Loaders as users have them: workers, streams, their own DataLoader; the resume fingerprint;
class masks and evaluation without holding the dataset."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info

import retain
from retain.batching import BatchSource, dataset_labels
from retain.checkpoint import data_digest
from retain.evaluation import accuracy_on_dataset

N = 60


def _tensors(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) * 0.3
    x[torch.arange(n), y] += 2.0
    return x, y


class Stream(IterableDataset):
    """A stream of unknown length (no __len__) that splits itself between DataLoader workers."""

    def __init__(self, n: int = N) -> None:
        self.x, self.y = _tensors(n)

    def __iter__(self):
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(start, len(self.y), step):
            yield self.x[i], self.y[i]


def _er(**kw) -> retain.ExperienceReplayModelUpdater:
    return retain.ExperienceReplayModelUpdater(
        retain.MultiLayerPerceptron(num_inputs=6, num_outputs=3, hidden_sizes=[8]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=200, batch_size=8, accelerator="cpu",
        **{"max_epochs": 2, **kw},
    )  # fmt: skip


def test_an_iterable_dataset_with_two_workers_is_one_pass_per_epoch() -> None:
    updater = _er(num_workers=2, persistent_workers=True)
    model = updater.update(Stream())
    memory = updater.learner.memory
    assert memory.seen == 2 * N, "each epoch is one pass over the stream, every item once"
    stored = {tuple(row.tolist()) for row in memory.inputs[: len(memory)]}
    assert stored == {tuple(row.tolist()) for row in Stream().x}, "both workers' halves reached the memory"
    x, y = _tensors()
    assert retain.evaluation.accuracy(model, x, y) > 0.6


def test_a_stream_has_no_total_and_an_empty_stream_is_refused() -> None:
    source = BatchSource(Stream(), 8, torch.device("cpu"), shuffle=True)
    assert source.num_batches is None and source.is_stream
    with pytest.raises(TypeError, match="stream of unknown length"):
        len(source)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _er().update(Stream(n=0))


def test_loader_options_are_checked() -> None:
    with pytest.raises(ValueError, match="persistent_workers=True needs num_workers > 0"):
        _er(persistent_workers=True)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        _er(num_workers=-1)


class Pairs(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _tensors()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_a_users_dataloader_gives_its_dataset_and_collate() -> None:
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    updater = _er(max_epochs=1)
    updater.update(DataLoader(Pairs(), batch_size=50, collate_fn=collate))
    assert calls and max(calls) == 4, "the user's collate built every batch, of retain's new-data batch size"
    assert updater.learner.memory.seen == N


class Augmented(Dataset):
    """Random per-item augmentation on the input; labels and a fixed side input stay put."""

    def __init__(self, labels: Tensor | None = None) -> None:
        self.x, self.y = _tensors()
        if labels is not None:
            self.y = labels

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return {"image": self.x[i] + 0.1 * torch.randn(6), "meta": self.x[i][:2]}, int(self.y[i])


def test_the_resume_fingerprint_ignores_random_augmentation_but_not_the_data() -> None:
    first, second = data_digest(Augmented()), data_digest(Augmented())
    assert first == second
    assert first["stable_leaves"] == ["meta"], "the augmented leaf is left out, the stable one kept"
    labels = Augmented().y.clone()
    labels[5] = (labels[5] + 1) % 3
    assert data_digest(Augmented(labels)) != first, "the labels identify the data"
    changed = Augmented()
    changed.x = changed.x + 1.0
    assert data_digest(changed) != first, "the un-augmented leaves of the sampled items identify it too"
    x, y = _tensors()
    assert data_digest(TensorDataset(x, y)) != data_digest(TensorDataset(x + 1e-3, y))


def test_an_augmenting_dataset_resumes_from_its_checkpoint(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(**kw):
        torch.manual_seed(0)  # the same initial weights: the same state before the update
        return retain.ExperienceReplayModelUpdater(
            retain.MultiLayerPerceptron(num_inputs=8, num_outputs=3, hidden_sizes=[8]),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=20, batch_size=8, max_epochs=3,
            accelerator="cpu", checkpoint_every_n_epochs=1, output_state_folder=tmp_path / "out",
            train_transform=lambda d: torch.cat([d["image"], d["meta"]], dim=1), **kw,
        )  # fmt: skip

    from retain.updaters import loop

    real_fit = loop.fit

    def crash_after_two_epochs(learner, **kw):
        def on_epoch_end(epoch, result):
            kw["on_epoch_end"](epoch, result)
            if epoch == 1:
                raise KeyboardInterrupt

        return real_fit(learner, **{**kw, "on_epoch_end": on_epoch_end})

    monkeypatch.setattr("retain.updaters.base.fit", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run().update(Augmented())
    monkeypatch.setattr("retain.updaters.base.fit", real_fit)
    resumed = run()
    resumed.update(Augmented())
    assert resumed.resumed_from_epoch == 2


class NoReads(Dataset):
    """Labels declared as ``targets``; reading an item counts."""

    def __init__(self) -> None:
        self.x, self.targets = _tensors()
        self.reads = 0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], int(self.targets[i])


def test_class_masks_read_labels_only() -> None:
    data = NoReads()
    assert torch.equal(dataset_labels(data), data.targets) and data.reads == 0
    streamed = dataset_labels(Pairs())
    assert torch.equal(streamed, Pairs().y)
    updater = _er(max_epochs=1, mask_unused_classes=True, update_classes=[0, 2])
    updater.learner.on_model_update_start(Pairs(), None)
    assert updater.learner._class_mask.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="update_classes must be a non-empty list"):
        _er(update_classes=[])


def test_accuracy_on_a_dataset_is_streamed_and_takes_plain_modules() -> None:
    x, y = _tensors()
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 6) * 5)
        model.bias.zero_()
    score, items = accuracy_on_dataset(model, Stream(), batch_size=7)
    expected = float((model(x).argmax(1) == y).float().mean())
    assert items == N and score == pytest.approx(expected)
    with pytest.raises(ValueError, match="empty dataset"):
        accuracy_on_dataset(model, Stream(n=0))


def test_repeated_distillation_streams_a_dataset_of_unknown_length() -> None:
    updater = retain.RepeatedDistillationModelUpdater(
        retain.MultiLayerPerceptron(num_inputs=6, num_outputs=3, hidden_sizes=[8]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1), memory_size=200, batch_size=8, max_epochs=2,
        consolidation_epochs=2, accelerator="cpu", seed=0, num_workers=2,
    )  # fmt: skip
    experts, writes = [], []
    real_expert, real_add = updater.train_expert, updater.learner.memory.add
    updater.train_expert = lambda *a, **kw: experts.append(real_expert(*a, **kw)) or experts[-1]
    updater.learner.memory.add = lambda x, y, meta: writes.append((x, meta["logits"])) or real_add(x, y, meta)
    model = updater.update(Stream())
    memory = updater.learner.memory
    assert memory.seen == N and len(memory) == N, "the new data entered the reservoir once, in one pass"
    with torch.no_grad():  # each item entered with the expert's logits of that very item (workers interleave)
        for inputs, logits in writes:
            torch.testing.assert_close(logits, experts[0].eval()(inputs))
    x, y = _tensors()
    stored = {tuple(row.tolist()) for row in memory.raw_items()[0]}
    assert stored == {tuple(row.tolist()) for row in x}
    assert updater.last_expert_fit is not None and updater.last_expert_fit.epochs == 2
    assert retain.evaluation.accuracy(model, x, y) > 0.4
