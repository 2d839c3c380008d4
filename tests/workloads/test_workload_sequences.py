"""Variable-length sequences: a collate that pads each batch to its longest item replays correctly.

The model is padding-invariant by construction (masked mean of embeddings), so with a learning
rate of 0 every logit the memory stored (from the joined new + replayed forward pass, whatever
length that batch was padded to) must equal the model's logits on the item alone, unpadded. A
replayed batch padded with the wrong value (e.g. mask 1 on padding, or a pad token that is not
the model's) would change them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import retain
from padded_sequences import PAD, MaskedMean, pad_collate


class Sequences(Dataset):
    """Items ``{"input_ids": (L,), "labels": c}`` with L from 2 to 12; the label is the first token mod 3."""

    def __init__(self, n: int = 60, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(2, 13, (1,), generator=g))
            ids = torch.randint(8, 40, (length,), generator=g)
            self.items.append((ids, int(ids[0]) % 3))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        return {"input_ids": self.items[i][0], "labels": self.items[i][1]}


def test_padded_batches_replay_with_stored_logits_matching_the_unpadded_items(tmp_path) -> None:
    torch.manual_seed(0)
    model = MaskedMean(3)
    updater = retain.DarkExperienceReplayModelUpdater(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.0), memory_size=25, memory_batch_size=6,
        batch_size=5, max_epochs=2, accelerator="cpu", pad_values={"input_ids": PAD},
        output_state_folder=tmp_path / "s1",
    )  # fmt: skip
    lengths = []  # (new batch length, joined batch length) per forward
    real_forward, real_step = updater.learner._forward, updater.learner.training_step

    def spy_step(batch, batch_idx):
        lengths.append([batch[0]["input_ids"].shape[1]])
        return real_step(batch, batch_idx)

    def spy_forward(inputs):
        lengths[-1].append(inputs["input_ids"].shape[1])
        return real_forward(inputs)

    updater.learner.training_step, updater.learner._forward = spy_step, spy_forward
    updater.update(Sequences(seed=0), train_dataset_collate_fn=pad_collate)
    memory = updater.learner.memory
    inputs, _, metadata = memory.raw_items()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[1] == 12, "the column grew to the longest item seen"
    assert len({new for new, *_ in lengths}) > 3, "new batches came padded to several lengths"
    assert any(new < joined[0] for new, *joined in lengths if joined), "new batches padded up to the memory's length"
    assert bool(((mask == 0) == (ids == PAD)).all()), "padding is the declared pad id with mask 0"
    known = {tuple(item[0].tolist()) for item in Sequences(seed=0).items}
    model.eval()
    with torch.no_grad():
        for row in range(len(memory)):
            alone = ids[row][mask[row].bool()]
            assert tuple(alone.tolist()) in known
            expected = model(alone[None], torch.ones_like(alone)[None])
            torch.testing.assert_close(metadata["logits"][row : row + 1], expected, rtol=1e-5, atol=1e-6)

    # a second update of shorter sequences, from the state folder: new batches padded up to the memory's length
    shorter = Sequences(seed=1)
    shorter.items = [(ids[:3], label) for ids, label in shorter.items]
    again = retain.DarkExperienceReplayModelUpdater(
        MaskedMean(3), optimizer=functools.partial(torch.optim.SGD, lr=0.0), memory_size=25,
        memory_batch_size=6, batch_size=5, max_epochs=1, accelerator="cpu", pad_values={"input_ids": PAD},
        input_state_folder=tmp_path / "s1",
    )  # fmt: skip
    again.update(DataLoader(shorter, batch_size=64, collate_fn=pad_collate))  # a user's DataLoader: its collate
    inputs, _, metadata = again.learner.memory.raw_items()
    restored = again.learner.memory
    with torch.no_grad():
        for row in range(len(restored)):
            ids_row, mask_row = inputs["input_ids"][row], inputs["attention_mask"][row]
            alone = ids_row[mask_row.bool()]
            item = {"input_ids": alone[None], "attention_mask": torch.ones_like(alone)[None]}
            expected = again.model(item)  # the adapter: nested inputs in, logits out
            torch.testing.assert_close(metadata["logits"][row : row + 1], expected, rtol=1e-5, atol=1e-6)
    assert bool((inputs["attention_mask"].sum(1) == 3).any()), "short items entered the memory"


def test_joint_holds_padded_sequences_of_every_update_with_the_pad_values(tmp_path) -> None:
    def joint(**kw):
        return retain.JointModelUpdater(
            MaskedMean(3), optimizer=functools.partial(torch.optim.SGD, lr=0.1), batch_size=8, max_epochs=1,
            accelerator="cpu", pad_values={"input_ids": PAD}, **kw,
        )  # fmt: skip

    short = Sequences(n=10, seed=1)
    short.items = [(ids[:2], label) for ids, label in short.items]
    joint(output_state_folder=tmp_path / "j1").update(short, train_dataset_collate_fn=pad_collate)
    second = joint(input_state_folder=tmp_path / "j1")
    second.update(Sequences(n=10, seed=2), train_dataset_collate_fn=pad_collate)
    held = second.learner.seen_inputs
    assert held["input_ids"].shape[0] == 20 and held["input_ids"].shape[1] > 2
    assert held["input_ids"][:10, 2:].eq(PAD).all() and held["attention_mask"][:10, 2:].eq(0).all()
