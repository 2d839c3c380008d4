"""How retain scales with the size of its replay memory (issue 13), one table per function.

Tables (choose with ``--tables``; each is a function ``table_<name>(args) -> list[str]`` returning
markdown lines, registered in ``TABLES``, so that more can be added beside these):

- ``der-step``: the DER++ training step (MLP 3072-100-100-10, 32 new + 32 memory items per draw,
  two draws per step) with the memory holding 1k ... 200k float32 3x32x32 items, median CPU time
  (``time.thread_time``, so that other processes on shared cores do not count) of ``--steps``
  steps on one thread, the sizes interleaved round by round; beside it the same step with the
  previous sampler (a permutation of the whole memory per draw, interleaved with the new one),
  ``memory.sample(32)`` and the ``randperm(n)[:32]`` that the sampler replaced.
- ``memory-growth``: the resident memory (RSS) that 1,000 items cost in a 200k-item memory, each
  measured in a fresh process, growing storage vs ``preallocate=True`` (the previous behaviour).
- ``pod-features``: the bytes POD-ER keeps per item (pooled vectors) vs the raw feature maps it
  kept before, for each ``distillation_type``.

    python benchmarks/scale.py [--tables der-step memory-growth] [--sizes 1000 10000 50000 200000] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from retain import memory as memory_module
from retain.memory import ReservoirMemory
from retain.methods.er import DarkExperienceReplayLearner
from retain.models import MultiLayerPerceptron

ITEM_SHAPE = (3, 32, 32)
ITEM_BYTES = 4 * 3 * 32 * 32
DEFAULT_SIZES = [1_000, 10_000, 50_000, 200_000]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------- DER step
def _der_learner(memory_size: int, seed: int = 0) -> tuple[DarkExperienceReplayLearner, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MultiLayerPerceptron(num_inputs=3 * 32 * 32, num_outputs=10, hidden_sizes=[100, 100])
    learner = DarkExperienceReplayLearner(
        model=model, optimizer=functools.partial(torch.optim.SGD, lr=0.01), memory_size=memory_size,
        alpha=0.3, beta=0.5, batch_size=32, memory_batch_size=32, loss_normalization=0, seed=seed,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    chunk = 10_000
    inputs = torch.rand(min(chunk, memory_size), *ITEM_SHAPE, generator=g)
    targets = torch.randint(0, 10, (inputs.shape[0],), generator=g)
    logits = torch.randn(inputs.shape[0], 10, generator=g)
    while learner.memory.seen < memory_size:  # fill the memory (the same random chunk, repeated)
        n = min(inputs.shape[0], memory_size - learner.memory.seen)
        learner.memory.add(inputs[:n], targets[:n], {"logits": logits[:n]})
    data = TensorDataset(torch.rand(64, *ITEM_SHAPE, generator=g), torch.randint(0, 10, (64,), generator=g))
    learner.on_model_update_start(data, None)
    optimizer, _ = learner.configure_optimizers()
    learner.on_train_start()
    return learner, optimizer


def _step_seconds(
    learner: DarkExperienceReplayLearner, optimizer: torch.optim.Optimizer, batch: tuple, steps: int
) -> list[float]:
    """CPU seconds of each step (``thread_time``: other processes sharing the cores do not count)."""
    times = []
    for i in range(steps):
        start = time.thread_time()
        loss = learner.training_step(batch, i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.on_train_batch_end(loss, batch, i)
        times.append(time.thread_time() - start)
    return times


def _median_us(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1e6 * statistics.median(times)


def table_der_step(args: argparse.Namespace) -> list[str]:
    sizes = args.sizes
    runs = {m: _der_learner(m) for m in sizes}
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(32, *ITEM_SHAPE, generator=g), torch.randint(0, 10, (32,), generator=g))
    rounds = 5
    per_round = max(1, args.steps // rounds)
    samplers = {"floyd": memory_module.FLOYD_MIN_ITEMS, "randperm": 2**62}  # the latter: the previous sampler
    times: dict[tuple[int, str], list[float]] = {(m, s): [] for m in sizes for s in samplers}
    try:
        for m in sizes:  # warm-up
            _step_seconds(*runs[m], batch, 10)
        for _ in range(rounds):  # interleaved: sizes and samplers alike see the same load
            for m in sizes:
                for sampler, threshold in samplers.items():
                    memory_module.FLOYD_MIN_ITEMS = threshold
                    times[m, sampler] += _step_seconds(*runs[m], batch, per_round)
    finally:
        memory_module.FLOYD_MIN_ITEMS = samplers["floyd"]
    base = statistics.median(times[sizes[0], "floyd"])
    lines = [
        f"DER++ step vs memory size (MLP 3072-100-100-10, 32 new + 2 x 32 memory items, "
        f"median CPU time of {rounds * per_round} steps, {torch.get_num_threads()} thread(s)); the "
        "previous sampler (a permutation of the whole memory per draw) beside the O(k) one",
        "",
        "| memory items | memory MB | DER++ step ms | vs 1st row | step ms, previous sampler "
        "| memory.sample(32) us | randperm(n)[:32] us |",
        "|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    for m in sizes:
        memory = runs[m][0].memory
        step = statistics.median(times[m, "floyd"])
        previous = statistics.median(times[m, "randperm"])
        sample_us = _median_us(lambda memory=memory: memory.sample(32), args.calls)
        perm_us = _median_us(lambda m=m: torch.randperm(m, generator=gen)[:32], args.calls)
        lines.append(
            f"| {m:,} | {m * ITEM_BYTES / 2**20:,.0f} | {1e3 * step:.3f} | {step / base:.2f}x "
            f"| {1e3 * previous:.3f} | {sample_us:.1f} | {perm_us:.1f} |"
        )
    return lines


# ------------------------------------------------------------------------------- memory growth
def _growth_child(preallocate: bool) -> dict[str, float]:
    """Runs in a fresh process: RSS added by 1,000 items (batches of 32) into a 200k memory."""
    items = torch.rand(1_000, *ITEM_SHAPE)
    targets = torch.randint(0, 10, (1_000,))
    logits = torch.randn(1_000, 10)
    warm = ReservoirMemory(40, seed=0)  # first-call costs of the same ops, outside the measure
    for start in range(0, 100, 32):
        warm.add(items[start : start + 32], targets[start : start + 32], {"logits": logits[start : start + 32]})
    del warm
    before = _rss_bytes()
    memory = ReservoirMemory(200_000, seed=0, preallocate=preallocate)
    for start in range(0, 1_000, 32):
        end = min(start + 32, 1_000)
        memory.add(items[start:end], targets[start:end], {"logits": logits[start:end]})
    growth = _rss_bytes() - before
    return {"growth_mb": growth / 2**20, "capacity": memory.capacity, "items_mb": 1_000 * ITEM_BYTES / 2**20}


def table_memory_growth(args: argparse.Namespace) -> list[str]:
    lines = [
        "RSS growth for 1,000 float32 3x32x32 items (+ logits) offered to a 200,000-item memory "
        "(fresh process each, batches of 32)",
        "",
        "| storage | rows allocated | RSS growth MB | items' own MB |",
        "|---|---|---|---|",
    ]
    for label, flag in [("growing (default)", "grow"), ("preallocate=True (previous)", "preallocate")]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--growth-child", flag],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(
            f"| {label} | {result['capacity']:,} | {result['growth_mb']:,.1f} | {result['items_mb']:.1f} |"
        )
    return lines


# ------------------------------------------------------------------------------- POD features
def table_pod_features(args: argparse.Namespace) -> list[str]:
    """What POD-ER keeps per item with the CIFAR recipe's ResNet-18 (width 64, 32x32 inputs)."""
    from retain.learners.components import POD_TYPES, pod_memory_vector
    from retain.models import ResNet18

    model = ResNet18(num_outputs=100, width=64, in_channels=3).eval()
    with torch.no_grad():
        model(torch.rand(2, *ITEM_SHAPE))
    features = model.get_intermediate_representation()
    raw = sum(f[0].numel() for f in features) * 4
    lines = [
        "POD-ER: stored features per item, ResNet-18 (width 64) on 3x32x32 inputs (input item: 12 KiB); "
        "memory of 2,000 items",
        "",
        "| distillation_type | raw maps KiB/item (previous) | stored KiB/item | ratio "
        "| memory of 2,000 MiB, raw / stored |",
        "|---|---|---|---|---|",
    ]
    for kind in POD_TYPES:
        stored = sum(pod_memory_vector(f, kind)[0].numel() for f in features) * 4
        lines.append(
            f"| {kind} | {raw / 1024:.1f} | {stored / 1024:.2f} | {raw / stored:.1f}x "
            f"| {2000 * raw / 2**20:,.0f} / {2000 * stored / 2**20:,.1f} |"
        )
    return lines


# ------------------------------------------------------------------------------- state I/O
def table_state_io(args: argparse.Namespace) -> list[str]:
    """State folder write/read seconds and peak extra RSS beside raw safetensors (benchmarks/scale_state.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale_state import state_io_rows

    return state_io_rows(list(args.sizes), repeats=1 if args.quick else args.repeats)


TABLES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "state-io": table_state_io,
    "der-step": table_der_step,
    "memory-growth": table_memory_growth,
    "pod-features": table_pod_features,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=list(TABLES))
    parser.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES, help="memory sizes (items)")
    parser.add_argument("--steps", type=int, default=500, help="timed DER++ steps per memory size")
    parser.add_argument("--calls", type=int, default=2000, help="timed sample() calls per memory size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process measurements per state I/O row (medians)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, calls and repeats")
    parser.add_argument("--growth-child", choices=["grow", "preallocate"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.growth_child:
        print(json.dumps(_growth_child(args.growth_child == "preallocate")))
        return
    if args.quick:
        args.steps, args.calls = 100, 300
    print(f"# benchmarks/scale.py {' '.join(sys.argv[1:])}\n")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    for name in args.tables:
        print("\n".join(TABLES[name](args)))
        print()


if __name__ == "__main__":
    main()
