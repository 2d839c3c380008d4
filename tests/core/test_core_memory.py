"""ReservoirMemory: uniform inclusion (with a biased variant proving the test's power), exact
agreement with sequential Algorithm R, bounds, sampling, transforms, metadata EMA and state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from scipy import stats
from torch import Tensor

from retain.memory import ReservoirMemory


class OffByOneMemory(ReservoirMemory):
    """The classic pitfall: draws j from {0, ..., t-2} instead of {0, ..., t-1} (kept for t > M)."""

    def reservoir_slots(self, n: int) -> Tensor:
        M = self.memory_size
        start = self.seen
        self.seen += n
        if start + n <= M:
            return torch.arange(start, start + n)
        order = torch.arange(n)
        t = order + (start + 1)
        u = torch.rand(n, dtype=torch.float64, generator=self.generator)
        drawn = (u * (t - 1).to(torch.float64)).floor().long()
        slots = torch.where(t <= M, t - 1, drawn)
        slots = torch.where(slots < M, slots, torch.full_like(slots, M))
        last_writer = torch.full((M + 1,), -1, dtype=torch.long)
        last_writer.scatter_reduce_(0, slots, order, reduce="amax")
        return torch.where(last_writer[slots] == order, slots, torch.full_like(slots, M))


def _batch_sizes(rng: np.random.Generator, total: int, low: int = 1, high: int = 17) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(rng.integers(low, high + 1)), total - sum(sizes)))
    return sizes


def _inclusion_p_value(memory_class: type[ReservoirMemory], memory_size: int, stream: int, runs: int) -> float:
    """p-value of a chi-square test that every item of the stream ends in memory with
    probability memory_size / stream (batches of random sizes 1..17, a fixed seed per run).

    Each run keeps exactly ``memory_size`` distinct items, so the counts are those of sampling
    without replacement: covariance ``runs p (1-p) N/(N-1) (I - 11'/N)``, whose pseudo-inverse
    gives the statistic below, chi-square with N - 1 degrees of freedom under uniformity.
    """
    rng = np.random.default_rng(1234)
    items = torch.arange(stream).unsqueeze(1)
    counts = np.zeros(stream)
    for run in range(runs):
        memory = memory_class(memory_size, seed=run)
        start = 0
        for size in _batch_sizes(rng, stream):
            memory.add(items[start : start + size], items[start : start + size, 0])
            start += size
        kept = memory.raw_items()[0][:, 0].numpy()
        assert len(set(kept.tolist())) == memory_size
        counts[kept] += 1
    p = memory_size / stream
    expected = runs * p
    statistic = (stream - 1) / stream * float(((counts - expected) ** 2).sum()) / (expected * (1 - p))
    return float(stats.chi2.sf(statistic, df=stream - 1))


def test_reservoir_inclusion_is_uniform() -> None:
    p_value = _inclusion_p_value(ReservoirMemory, memory_size=10, stream=40, runs=3000)
    assert p_value > 1e-3, f"inclusion frequencies are not memory_size/seen (p={p_value:.2e})"


def test_uniformity_check_catches_the_off_by_one_draw() -> None:
    """Same check, same seeds: the biased draw keeps the first items with probability (M-1)/(N-1)
    instead of M/N, which the check must reject (otherwise the test above has no power)."""
    p_value = _inclusion_p_value(OffByOneMemory, memory_size=10, stream=40, runs=3000)
    assert p_value < 1e-3, f"the check did not detect the off-by-one reservoir (p={p_value:.2e})"


def _sequential_algorithm_r(
    memory_size: int, batches: list[Tensor], draws: list[Tensor | None]
) -> tuple[list[int], list[Tensor]]:
    """Vitter's Algorithm R one item at a time, fed the uniform draws the memory made for each
    batch. Returns the final memory contents (item ids by slot) and each batch's expected slots."""
    memory: list[int] = []
    seen = 0
    expected_slots = []
    for batch, u in zip(batches, draws, strict=True):
        slots = torch.full((len(batch),), memory_size, dtype=torch.long)
        for i, item in enumerate(batch.tolist()):
            seen += 1
            if seen <= memory_size:
                memory.append(item)
                slot = seen - 1
            else:
                assert u is not None, "a batch beyond the fill point must draw"
                j = int(np.floor(float(u[i]) * seen))
                if j >= memory_size:
                    continue
                memory[j] = item
                slot = j
            slots[slots == slot] = memory_size  # an earlier item of this batch lost the slot
            slots[i] = slot
        expected_slots.append(slots)
    return memory, expected_slots


@pytest.mark.parametrize("memory_size, sizes", [(7, [3, 2, 5, 1, 17, 9, 30, 4, 12]), (3, [2, 50, 40, 1, 64])])
def test_vectorised_add_equals_sequential_algorithm_r(
    monkeypatch: pytest.MonkeyPatch, memory_size: int, sizes: list[int]
) -> None:
    memory = ReservoirMemory(memory_size, seed=5)
    real_rand = torch.rand
    recorded: list[Tensor] = []

    def recording_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        if kwargs.get("generator") is memory.generator:
            recorded.append(out.clone())
        return out

    monkeypatch.setattr(torch, "rand", recording_rand)
    batches, draws, slots = [], [], []
    start = 0
    for size in sizes:
        batch = torch.arange(start, start + size)
        start += size
        before = len(recorded)
        slots.append(memory.add(batch.unsqueeze(1).float(), batch, {"id": batch.unsqueeze(1)}))
        assert len(recorded) - before <= 1
        draws.append(recorded[-1] if len(recorded) > before else None)
        batches.append(batch)
    expected_memory, expected_slots = _sequential_algorithm_r(memory_size, batches, draws)
    inputs, targets, metadata = memory.raw_items()
    assert targets.tolist() == expected_memory
    assert inputs[:, 0].long().tolist() == expected_memory
    assert metadata["id"][:, 0].tolist() == expected_memory
    for got, want in zip(slots, expected_slots, strict=True):
        assert torch.equal(got, want)
    # the large batches must have had several items drawing the same slot (later one wins)
    clashes = 0
    for batch, u, got in zip(batches, draws, slots, strict=True):
        if u is not None:
            t = batch + 1  # item ids are their 0-based stream positions
            accepted = (t <= memory_size) | ((u * t.double()).floor() < memory_size)
            clashes += int(accepted.sum()) - int((got < memory_size).sum())
    assert clashes > 0


def _filled_memory(memory_size: int = 8, items: int = 30, seed: int = 0, **kwargs) -> ReservoirMemory:
    memory = ReservoirMemory(memory_size, seed=seed, **kwargs)
    ids = torch.arange(items)
    for start in range(0, items, 7):
        batch = ids[start : start + 7]
        memory.add(batch.float().unsqueeze(1).repeat(1, 3), batch % 10, {"logits": batch.float().unsqueeze(1) * 2})
    return memory


def test_memory_never_exceeds_its_size_and_holds_only_seen_items() -> None:
    memory = ReservoirMemory(10, seed=1)
    offered: set[int] = set()
    for step, size in enumerate([4, 3, 9, 1, 16, 2, 30]):
        batch = torch.arange(1000 * step, 1000 * step + size)
        offered.update(batch.tolist())
        memory.add(batch.unsqueeze(1), batch)
        inputs, targets, _ = memory.raw_items()
        assert len(memory) == min(memory.seen, 10) == inputs.shape[0]
        assert memory.inputs is not None and memory.inputs.shape[0] == 11  # 10 slots + the spare row
        assert set(inputs[:, 0].tolist()) <= offered
        assert torch.equal(inputs[:, 0], targets)  # items stay whole: input and target of the same item
    assert memory.seen == 65
    assert len(set(memory.raw_items()[1].tolist())) == 10


def test_sample_is_without_replacement() -> None:
    memory = _filled_memory(memory_size=40, items=100)
    drawn = set()
    for k in [1, 5, 20, 39] * 10:
        batch = memory.sample(k)
        assert batch is not None and len(batch) == k
        assert batch.indices.unique().numel() == k
        assert batch.indices.max() < 40
        drawn.update(batch.indices.tolist())
    assert drawn == set(range(40))
    whole = memory.sample(100)
    assert whole is not None and sorted(whole.indices.tolist()) == list(range(40))
    raw_inputs, raw_targets, raw_meta = memory.raw_items()
    assert torch.equal(whole.inputs, raw_inputs[whole.indices])
    assert torch.equal(whole.targets, raw_targets[whole.indices])
    assert torch.equal(whole.metadata["logits"], raw_meta["logits"][whole.indices])
    assert ReservoirMemory(5).sample(3) is None
    assert memory.sample(0) is None


def test_transforms_apply_on_sample_but_storage_stays_raw() -> None:
    memory = _filled_memory(transform=lambda x: x * 2 + 1, target_transform=lambda y: y + 100)
    raw_before = [t.clone() for t in memory.raw_items()[:2]]
    batch = memory.sample(5)
    assert batch is not None
    raw_inputs, raw_targets, _ = memory.raw_items()
    assert torch.equal(batch.inputs, raw_inputs[batch.indices] * 2 + 1)
    assert torch.equal(batch.targets, raw_targets[batch.indices] + 100)
    assert torch.equal(raw_inputs, raw_before[0]) and torch.equal(raw_targets, raw_before[1])
    assert float(raw_inputs.max()) < 30  # the stored items are the raw ids, not transformed ones


def test_update_metadata_is_an_exact_ema_in_place() -> None:
    memory = _filled_memory()
    memory.set_metadata("logits", torch.arange(16, dtype=torch.float32).reshape(8, 2))
    indices = torch.tensor([1, 6, 3])
    values = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    memory.update_metadata("logits", indices, values, gamma=0.25)
    stored = memory.raw_items()[2]["logits"]
    assert stored[1].tolist() == [0.25 * 2 + 0.75 * 10, 0.25 * 3 + 0.75 * 20]
    assert stored[6].tolist() == [0.25 * 12 + 0.75 * 30, 0.25 * 13 + 0.75 * 40]
    assert stored[3].tolist() == [0.25 * 6 + 0.75 * 50, 0.25 * 7 + 0.75 * 60]
    untouched = [0, 2, 4, 5, 7]
    assert torch.equal(stored[untouched], torch.arange(16, dtype=torch.float32).reshape(8, 2)[untouched])
    memory.update_metadata("logits", torch.tensor([0]), torch.tensor([[-1.0, -2.0]]), gamma=0.0)
    assert memory.raw_items()[2]["logits"][0].tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="logits"):
        memory.set_metadata("logits", torch.zeros(3, 2))


def _through_files(memory: ReservoirMemory) -> tuple[dict, dict[str, Tensor]]:
    """state_dict -> the bytes a state folder holds -> parsed back (JSON + safetensors)."""
    meta, tensors = memory.state_dict()
    return json.loads(json.dumps(meta)), load_safetensors(save_safetensors(tensors))


def test_state_round_trip_continues_identically() -> None:
    original = _filled_memory(memory_size=8, items=30, seed=3)
    restored = ReservoirMemory(8, seed=999)  # a different seed: the saved generator state must win
    restored.load_state_dict(*_through_files(original))
    assert restored.seen == original.seen
    for a, b in zip(original.raw_items()[:2], restored.raw_items()[:2], strict=True):
        assert torch.equal(a, b)
    ids = torch.arange(30, 80)
    for start in range(0, 50, 11):
        batch = ids[start : start + 11]
        args = (batch.float().unsqueeze(1).repeat(1, 3), batch % 10, {"logits": batch.float().unsqueeze(1) * 2})
        assert torch.equal(original.add(*args), restored.add(*args))
        a, b = original.sample(4), restored.sample(4)
        assert a is not None and b is not None
        assert torch.equal(a.indices, b.indices) and torch.equal(a.inputs, b.inputs)
    for a, b in zip(original.raw_items()[:2], restored.raw_items()[:2], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(original.raw_items()[2]["logits"], restored.raw_items()[2]["logits"])
    with pytest.raises(ValueError, match="memory_size"):
        ReservoirMemory(9).load_state_dict(*original.state_dict())


def test_state_of_a_partly_filled_memory_round_trips() -> None:
    original = ReservoirMemory(10, seed=2)
    original.add(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    restored = ReservoirMemory(10)
    restored.load_state_dict(*_through_files(original))
    assert len(restored) == 4 and restored.inputs is not None and restored.inputs.shape == (11, 2)
    assert torch.equal(
        original.add(torch.ones(9, 2), torch.ones(9, dtype=torch.long)),
        restored.add(torch.ones(9, 2), torch.ones(9, dtype=torch.long)),
    )


def test_memory_size_zero_keeps_nothing() -> None:
    memory = ReservoirMemory(0, seed=0)
    slots = memory.add(torch.ones(5, 3), torch.zeros(5, dtype=torch.long))
    assert slots.tolist() == [0] * 5
    assert len(memory) == 0 and memory.seen == 5
    assert memory.sample(4) is None
    restored = ReservoirMemory(0)
    restored.load_state_dict(*_through_files(memory))
    assert restored.seen == 5 and len(restored) == 0


@pytest.mark.parametrize("bad_size", [-1, 2.5, True, "3"])
def test_invalid_memory_size_is_rejected(bad_size) -> None:
    with pytest.raises(ValueError, match="memory_size"):
        ReservoirMemory(bad_size)


def test_wrong_shapes_are_rejected() -> None:
    memory = ReservoirMemory(4)
    memory.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"logits": torch.zeros(2, 5)})
    ok_targets, ok_meta = torch.zeros(2, dtype=torch.long), {"logits": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match=r"per-item shape \(3,\), got \(3, 1\) \(a different number of dims\)"):
        memory.add(torch.zeros(2, 3, 1), ok_targets, ok_meta)  # a longer leaf grows its column, more dims do not
    with pytest.raises(ValueError, match="dtype"):
        memory.add(torch.zeros(2, 3, dtype=torch.float64), ok_targets, ok_meta)
    with pytest.raises(ValueError, match="number of items"):
        memory.add(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), ok_meta)
    with pytest.raises(ValueError, match="number of items"):
        memory.add(torch.zeros(2, 3), ok_targets, {"logits": torch.zeros(1, 5)})
    with pytest.raises(ValueError, match="logits"):
        memory.add(torch.zeros(2, 3), ok_targets, {"logits": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="metadata"):
        memory.add(torch.zeros(2, 3), ok_targets, {})
    with pytest.raises(ValueError, match="targets must be a 1-D tensor"):
        memory.add(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), ok_meta)  # per-item target shape
    with pytest.raises(ValueError, match="targets must be integer class indices"):
        memory.add(torch.zeros(2, 3), torch.zeros(2), ok_meta)
    assert memory.seen == 2  # rejected batches leave the memory untouched
