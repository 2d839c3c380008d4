"""DDP memory shards and merges with nested, variable-length inputs (no process group needed)."""

from __future__ import annotations

import torch

from retain.memory import ReservoirMemory
from retain.updaters.distributed import merge_memories, shard_memory

PAD = 5


def _memory(lengths: list[int], seed: int) -> ReservoirMemory:
    memory = ReservoirMemory(6, seed=seed, pad_values={"input_ids": PAD})
    for i, length in enumerate(lengths):
        ids = torch.full((1, length), 10 + i)
        memory.add({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([i % 3]),
                   {"logits": torch.full((1, 3), float(i))})  # fmt: skip
    return memory


def test_ranks_with_different_lengths_merge_padded_to_the_longest_with_the_pad_values() -> None:
    short, long = _memory([2, 3], seed=0), _memory([7, 4, 5], seed=1)
    merged = merge_memories([short.state_dict(), long.state_dict()], short, 6)
    inputs, _, metadata = merged.raw_items()
    assert inputs["input_ids"].shape == (5, 7) and merged.seen == 5
    assert inputs["input_ids"][0].tolist() == [10, 10, PAD, PAD, PAD, PAD, PAD], "the declared pad id"
    assert inputs["attention_mask"][0].tolist() == [1, 1, 0, 0, 0, 0, 0], "other leaves pad with 0"
    assert inputs["input_ids"][2].tolist() == [10] * 7
    assert metadata["logits"][:, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]


def test_a_nested_memory_shards_round_robin_and_merges_back() -> None:
    whole = _memory([2, 6, 3, 4, 5, 2], seed=0)
    parts = [shard_memory(whole, rank, 2) for rank in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    assert parts[1].raw_items()[0]["input_ids"][0, 0].item() == 11  # item 1 went to rank 1
    merged = merge_memories([p.state_dict() for p in parts], whole, 6)
    ids = merged.raw_items()[0]["input_ids"]
    assert sorted(int(row[0]) for row in ids) == list(range(10, 16))
    assert ids.shape[1] == 6 and merged.pad_values == {"input_ids": PAD}
