"""The O(k) sampler: exact Floyd by enumeration, uniform sets and orders at a seed (with a biased
variant the same check rejects), and a cost that does not depend on how many items the memory holds."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from retain import memory as memory_module
from retain.memory import ReservoirMemory, floyd_resolve, sample_without_replacement


def _all_draws(n: int, k: int) -> torch.Tensor:
    """Every possible draw sequence of Floyd: t_i in {0, ..., n-k+i}, one row each."""
    return torch.tensor(list(itertools.product(*[range(n - k + i + 1) for i in range(k)])))


@pytest.mark.parametrize("n, k", [(1, 1), (4, 2), (6, 4), (7, 7), (8, 5), (9, 6)])
def test_floyd_resolve_gives_every_k_subset_equally_often_over_all_draws(n: int, k: int) -> None:
    """Exact: the draws are equally likely, so each k-subset must come from the same number of them."""
    draws = _all_draws(n, k)
    out = floyd_resolve(draws, n)
    assert out.shape == draws.shape
    assert (out.sort(dim=1).values.diff(dim=1) > 0).all(), "an output repeats an index"
    assert int(out.min()) >= 0 and int(out.max()) < n
    counts = Counter(tuple(sorted(row)) for row in out.tolist())
    assert len(counts) == math.comb(n, k)
    assert set(counts.values()) == {len(draws) // math.comb(n, k)}


def test_floyd_resolve_equals_the_sequential_algorithm() -> None:
    n, k = 9, 6
    draws = _all_draws(n, k)
    out = floyd_resolve(draws, n).tolist()
    for row, got in zip(draws.tolist(), out, strict=True):
        chosen: list[int] = []
        for i, t in enumerate(row):
            chosen.append(n - k + i if t in chosen else t)
        assert got == chosen


def test_floyd_without_full_pointer_jumping_repeats_indices() -> None:
    """The biased variant the statistical test below must reject: one jump misses long chains."""
    out = floyd_resolve(_all_draws(9, 6), 9, jumps=1)
    assert not (out.sort(dim=1).values.diff(dim=1) > 0).all()


def _floyd_batch(n: int, k: int, runs: int, seed: int, jumps: int | None = None) -> torch.Tensor:
    """``runs`` samples drawn as ``sample_without_replacement`` draws them, resolved in one call."""
    g = torch.Generator().manual_seed(seed)
    bounds = torch.arange(n - k + 1, n + 1, dtype=torch.float64)
    t = (torch.rand(runs, k, dtype=torch.float64, generator=g) * bounds).long()
    chosen = floyd_resolve(t, n, jumps=jumps)
    order = torch.rand(runs, k, generator=g).argsort(dim=1)  # a uniform permutation per run
    return chosen.gather(1, order)


def _ordered_tuple_p_value(samples: torch.Tensor, n: int) -> float:
    """Chi-square p-value that every ordered k-tuple of distinct indices is equally likely."""
    runs, k = samples.shape
    categories = math.perm(n, k)
    counts = Counter(map(tuple, samples.tolist()))
    valid = [c for t, c in counts.items() if len(set(t)) == k]
    invalid = runs - sum(valid)
    observed = np.array(valid + [0] * (categories - len(valid)), dtype=float)
    expected = runs / categories
    statistic = float(((observed - expected) ** 2).sum() / expected)
    # an invalid tuple (a repeated index) is an observation in a category of probability 0
    statistic += invalid * runs
    return float(stats.chi2.sf(statistic, df=categories - 1))


def test_ordered_samples_are_uniform_and_the_check_rejects_the_biased_variant() -> None:
    n, k, runs = 7, 5, 200_000
    p_value = _ordered_tuple_p_value(_floyd_batch(n, k, runs, seed=0), n)
    assert p_value > 1e-3, f"Floyd's ordered samples are not uniform (p={p_value:.2e})"
    p_biased = _ordered_tuple_p_value(_floyd_batch(n, k, runs, seed=0, jumps=1), n)
    assert p_biased < 1e-6, f"the check did not detect one-jump Floyd (p={p_biased:.2e})"


def _set_p_value(samples: torch.Tensor, n: int) -> float:
    runs, k = samples.shape
    counts = Counter(tuple(sorted(t)) for t in samples.tolist() if len(set(t)) == k)
    categories = math.comb(n, k)
    observed = np.array(list(counts.values()) + [0] * (categories - len(counts)), dtype=float)
    invalid = runs - int(observed.sum())
    expected = runs / categories
    statistic = float(((observed - expected) ** 2).sum() / expected) + invalid * runs
    return float(stats.chi2.sf(statistic, df=categories - 1))


def test_set_check_also_rejects_the_biased_variant_when_repeats_are_dropped() -> None:
    """Even ignoring the repeated indices themselves, one-jump Floyd skews which sets come out."""
    n, k, runs = 8, 6, 200_000
    assert _set_p_value(_floyd_batch(n, k, runs, seed=1), n) > 1e-3
    biased = _floyd_batch(n, k, runs, seed=1, jumps=1)
    distinct = biased[(biased.sort(dim=1).values.diff(dim=1) > 0).all(dim=1)]
    counts = Counter(tuple(sorted(t)) for t in distinct.tolist())
    expected = len(distinct) / math.comb(n, k)
    observed = np.array([counts.get(s, 0) for s in itertools.combinations(range(n), k)], dtype=float)
    p_value = float(stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), df=len(observed) - 1))
    assert p_value < 1e-6, f"the biased variant's sets looked uniform (p={p_value:.2e})"


def test_sample_without_replacement_is_uniform_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The function itself (Floyd forced below its size threshold), ordered tuples at a seed."""
    monkeypatch.setattr(memory_module, "FLOYD_MIN_ITEMS", 0)
    n, k, runs = 5, 3, 12_000
    g = torch.Generator().manual_seed(3)
    samples = torch.stack([sample_without_replacement(n, k, g) for _ in range(runs)])
    assert _ordered_tuple_p_value(samples, n) > 1e-3


@pytest.mark.parametrize("threshold", [0, 10**9])
def test_memory_sample_is_distinct_in_range_and_covers_the_memory(
    monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    """Both branches (Floyd and the small-memory randperm) through ReservoirMemory.sample."""
    monkeypatch.setattr(memory_module, "FLOYD_MIN_ITEMS", threshold)
    memory = ReservoirMemory(40, seed=0)
    memory.add(torch.arange(100).float().unsqueeze(1), torch.arange(100) % 5)
    seen = set()
    for k in [1, 7, 16, 39, 40, 100] * 5:
        batch = memory.sample(k)
        assert batch is not None and len(batch) == min(k, 40)
        assert batch.indices.unique().numel() == len(batch) and int(batch.indices.max()) < 40
        assert torch.equal(batch.inputs, memory.raw_items()[0][batch.indices])
        seen.update(batch.indices.tolist())
    assert seen == set(range(40))
    with pytest.raises(ValueError, match="cannot draw 5 distinct items out of 4"):
        sample_without_replacement(4, 5, torch.Generator())


class _RecordShapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else [out]:
            if isinstance(value, torch.Tensor):
                self.ops.append((str(func), value.numel()))
        return out


@pytest.mark.parametrize("k", [16, 128])
def test_sampling_cost_does_not_depend_on_the_number_of_items(k: int) -> None:
    """The same tensor ops, none larger than k x k elements or a k-row batch, at 20k and 200k items
    (a randperm of the memory would allocate 200k indices)."""
    traces = []
    for n in (20_000, 200_000):
        memory = ReservoirMemory(n, seed=0)
        memory.add(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))
        memory.sample(k)  # warm the caches of constants
        with _RecordShapes() as recorder:
            batch = memory.sample(k)
        assert batch is not None and batch.indices.unique().numel() == k
        assert max(numel for _, numel in recorder.ops) <= max(k * k, 2 * k + 2), recorder.ops
        traces.append(recorder.ops)
    assert traces[0] == traces[1]


def test_drawing_no_item_or_every_item_is_allowed_and_more_is_refused() -> None:
    from retain.memory import sample_without_replacement

    g = torch.Generator().manual_seed(0)
    assert sample_without_replacement(10, 0, g).numel() == 0
    assert sorted(sample_without_replacement(10, 10, g).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="cannot draw 11 distinct items out of 10"):
        sample_without_replacement(10, 11, g)


def test_a_whole_permutation_draws_below_floyd_min_items_and_floyd_from_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented switch: ``randperm(n)`` for n < FLOYD_MIN_ITEMS (and k == n), Floyd's
    O(k) draw from FLOYD_MIN_ITEMS items on (its only randperm is of the k drawn)."""
    sizes: list[int] = []
    real = torch.randperm

    def randperm(n: int, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", randperm)
    g = torch.Generator().manual_seed(0)
    limit = memory_module.FLOYD_MIN_ITEMS
    assert limit == 16_384
    for n, k, expected in [(limit - 1, 5, [limit - 1]), (limit, 5, [5]), (limit, limit, [limit]), (10**6, 3, [3])]:
        sizes.clear()
        drawn = memory_module.sample_without_replacement(n, k, g)
        assert sizes == expected, (n, k, sizes)
        assert drawn.shape == (k,) and len(set(drawn.tolist())) == k and int(drawn.min()) >= 0 and int(drawn.max()) < n
