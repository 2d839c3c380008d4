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


def test_derived_generator_states_are_the_documented_seeds() -> None:
    """Rank r > 0: a generator seeded s + r, s the first draw in [0, 2**62) from a copy of rank 0's."""
    source = torch.Generator().manual_seed(11)
    state = source.get_state()
    copy_ = torch.Generator()
    copy_.set_state(state.clone())
    s = int(torch.randint(0, 2**62, (1,), generator=copy_))
    for rank in (1, 3):
        expected = torch.Generator().manual_seed(s + rank).get_state()
        assert torch.equal(derive_generator_state(state, rank), expected), rank
    assert torch.equal(source.get_state(), state)  # rank 0's generator is not advanced
    zero = derive_generator_state(state, 0)
    zero[0] ^= 1
    assert not torch.equal(zero, state)  # rank 0 gets a copy, not the caller's tensor


def test_shard_indices_pad_by_wrapping_the_seeded_permutation() -> None:
    order = torch.randperm(5, generator=torch.Generator().manual_seed(9)).tolist()
    padded = (order * 2)[:6]  # ceil(5 / 2) = 3 items per rank
    assert shard_indices(5, 0, 2, seed=9).tolist() == padded[0::2]
    assert shard_indices(5, 1, 2, seed=9).tolist() == padded[1::2]
    assert shard_indices(2, 2, 3, seed=9).tolist() == [(torch.randperm(2, generator=torch.Generator().manual_seed(9))
                                                        .tolist() * 2)[2]]  # fmt: skip
    with pytest.raises(ValueError, match=r"^the dataset is empty: an update needs at least one item$"):
        shard_indices(0, 0, 2, seed=9)


def test_a_shard_takes_every_wth_item_and_a_generator_derived_for_its_rank() -> None:
    whole = filled_memory(10, 10)
    inputs, targets, metadata = whole.raw_items()
    for rank in range(3):
        part = shard_memory(whole, rank, 3)
        x, y, m = part.raw_items()
        assert torch.equal(x, inputs[rank::3]) and torch.equal(y, targets[rank::3])
        assert torch.equal(m["logits"], metadata["logits"][rank::3])
        expected = derive_generator_state(whole.generator.get_state(), rank)
        assert torch.equal(part.generator.get_state(), expected), rank
        assert part.pad_values == whole.pad_values and part.memory_device == whole.memory_device


def test_merging_ranks_without_items_keeps_seen_and_rank_0s_generator() -> None:
    template = ReservoirMemory(4, seed=0)
    empty_a, empty_b = ReservoirMemory(2, seed=1), ReservoirMemory(2, seed=2)
    empty_a.seen, empty_b.seen = 0, 0
    merged = merge_memories([empty_a.state_dict(), empty_b.state_dict()], template, 4)
    assert len(merged) == 0 and merged.seen == 0 and merged.metadata == {}
    assert torch.equal(merged.generator.get_state(), empty_a.generator.get_state())
    # rank 0 saw nothing, rank 1 holds items with logits: names and items come from rank 1
    slotless = ReservoirMemory(0, seed=3)
    slotless.add(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), {"logits": torch.zeros(3, 10)})
    full = filled_memory(2, 5, seed=4)
    merged = merge_memories([slotless.state_dict(), full.state_dict()], template, 2)
    assert merged.memory_size == 2 and merged.seen == 3 + 5 and sorted(merged.metadata) == ["logits"]
    assert rows(merged) == rows(full)
    assert torch.equal(merged.generator.get_state(), slotless.generator.get_state())


def test_bare_tensor_ranks_of_different_widths_merge_padded_with_the_inputs_pad_value() -> None:
    a = ReservoirMemory(4, seed=0, pad_values={"": -1})
    a.add(torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    b = ReservoirMemory(4, seed=1, pad_values={"": -1})
    b.add(torch.full((1, 4), 2.0), torch.ones(1, dtype=torch.long))
    merged = merge_memories([a.state_dict(), b.state_dict()], a, 4)
    assert merged.raw_items()[0].tolist() == [[1, 1, -1, -1], [1, 1, -1, -1], [2, 2, 2, 2]]
    assert merged.raw_items()[1].tolist() == [0, 0, 1] and merged.seen == 3


def test_in_launched_job_needs_all_three_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from retain.updaters.distributed import in_launched_job

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not in_launched_job()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert not in_launched_job()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert in_launched_job()
