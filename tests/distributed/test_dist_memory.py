"""The DDP memory rules without processes: shares, shards of the data, re-sharing and merging a
memory, derived generator states (retain.updaters.distributed)."""

from __future__ import annotations

import pytest
import torch

from retain.memory import ReservoirMemory
from retain.updaters.distributed import (
    derive_generator_state,
    merge_memories,
    shard_indices,
    shard_memory,
    share,
)


def filled_memory(memory_size: int, offered: int, seed: int = 0) -> ReservoirMemory:
    """A memory that was offered ``offered`` distinct items (input row i = i), with a logits column."""
    memory = ReservoirMemory(memory_size, seed=seed)
    inputs = torch.arange(offered, dtype=torch.float32)[:, None].repeat(1, 3)
    targets = torch.arange(offered) % 10
    logits = torch.randn(offered, 10, generator=torch.Generator().manual_seed(seed))
    for start in range(0, offered, 7):
        memory.add(inputs[start : start + 7], targets[start : start + 7], {"logits": logits[start : start + 7]})
    return memory


def rows(memory: ReservoirMemory) -> list[tuple]:
    """The memory's items as a sorted list of (input, target, metadata...) tuples: its multiset."""
    if len(memory) == 0:
        return []
    inputs, targets, metadata = memory.raw_items()
    columns = [inputs.flatten(1), targets[:, None].float()] + [metadata[k].flatten(1) for k in sorted(metadata)]
    return sorted(tuple(r) for r in torch.cat(columns, dim=1).tolist())


@pytest.mark.parametrize("total", [0, 1, 5, 200, 201])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_share_deals_the_total_evenly_lower_ranks_first(total: int, world: int) -> None:
    shares = [share(total, world, r) for r in range(world)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (7, 3), (1, 2), (270, 4)])
def test_shard_indices_cover_the_data_with_equal_shards(n: int, world: int) -> None:
    shards = [shard_indices(n, r, world, seed=5) for r in range(world)]
    per_rank = -(-n // world)
    assert [len(s) for s in shards] == [per_rank] * world  # equal step counts on every rank
    union = torch.cat(shards)
    assert sorted(set(union.tolist())) == list(range(n))  # every item trained on
    assert len(union) - n == per_rank * world - n  # only the padding repeats items
    assert torch.equal(shard_indices(n, 0, world, seed=5), shards[0])  # seeded: the same on every rank
    assert not torch.equal(shard_indices(n, 0, world, seed=6), shards[0]) or n <= 2


@pytest.mark.parametrize(("memory_size", "offered"), [(20, 50), (20, 13), (20, 20), (3, 40), (2, 9)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_then_merge_gives_back_the_same_memory(memory_size: int, offered: int, world: int) -> None:
    memory = filled_memory(memory_size, offered)
    parts = [shard_memory(memory, r, world) for r in range(world)]
    assert [p.memory_size for p in parts] == [share(memory_size, world, r) for r in range(world)]
    assert [p.seen for p in parts] == [share(offered, world, r) for r in range(world)]
    for p in parts:  # every part holds exactly min(seen_r, M_r) items: a valid reservoir
        assert len(p) == min(p.seen, p.memory_size)
    merged = merge_memories([p.state_dict() for p in parts], memory, memory_size)
    assert merged.seen == memory.seen == offered
    assert merged.memory_size == memory_size
    assert rows(merged) == rows(memory)
    assert torch.equal(merged.generator.get_state(), memory.generator.get_state())  # rank 0's is saved


def test_reshare_from_two_ranks_to_three_keeps_items_and_seen() -> None:
    """A state written by 2 ranks (each rank's own reservoir) loads on 3 with the same items."""
    whole = filled_memory(30, 100)
    two = [shard_memory(whole, r, 2) for r in range(2)]
    for r, part in enumerate(two):  # the ranks go on with their own streams
        extra = torch.full((25, 3), 1000.0 + r)
        part.add(extra, torch.full((25,), r), {"logits": torch.zeros(25, 10)})
    written = merge_memories([p.state_dict() for p in two], whole, 30)
    assert written.seen == 150
    assert rows(written) == sorted(rows(two[0]) + rows(two[1]))
    three = [shard_memory(written, r, 3) for r in range(3)]
    assert sorted(row for p in three for row in rows(p)) == rows(written)
    assert [p.seen for p in three] == [50, 50, 50]
    assert all(len(p) == p.memory_size == 10 for p in three)


def test_a_rank_without_slots_still_counts_what_it_sees() -> None:
    whole = filled_memory(1, 5)
    parts = [shard_memory(whole, r, 3) for r in range(3)]
    assert [p.memory_size for p in parts] == [1, 0, 0]
    parts[1].add(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"logits": torch.zeros(4, 10)})
    merged = merge_memories([p.state_dict() for p in parts], whole, 1)
    assert merged.seen == 2 + 2 + 1 + 4  # shares of 5, plus the 4 items rank 1 saw
    assert rows(merged) == rows(whole)


def test_derived_generator_states() -> None:
    state = torch.Generator().manual_seed(3).get_state()
    assert torch.equal(derive_generator_state(state, 0), state)
    derived = [derive_generator_state(state, r) for r in (1, 2)]
    assert torch.equal(derived[0], derive_generator_state(state, 1))  # deterministic
    draws = []
    for s in [state, *derived]:
        g = torch.Generator()
        g.set_state(s)
        draws.append(torch.rand(4, generator=g))
    assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(draws[1], draws[2])
