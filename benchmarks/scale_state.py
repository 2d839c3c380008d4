"""State I/O at scale: write and read seconds, MB/s and peak extra RSS of a replay memory's state
beside a raw safetensors save + fsync of the same tensors, each measured in a fresh process.

    .venv/bin/python benchmarks/scale_state.py --items 1000 10000 50000 200000

Items are float32 3x32x32 inputs with int64 targets and 10 float32 logits (DER's memory). "Peak
extra" is the process's peak RSS minus its RSS before the operation (with the tensors already
in memory for writes), divided by the state's size: the issue's target is <= 1.3 for both. A
memory load's peak extra includes the memory itself (1.0x) and, in a cold process, the pages of
torch's code that the first call of each op faults in (file-backed, ~5 MB); the last column
loads a 2-item memory in the same process first, as an updater has run those ops (building the
model, loading its weights) before it loads its memory. Each row is the median of ``--repeats``
measurements (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

op, items, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
from retain.state import StateFolder, write_state
from safetensors.torch import save_file
manifest = {"retain_version": "bench", "method": "bench", "model": {"class": "x", "hyperparameters": {},
            "task_ids": []}, "method_options": {}, "options": {}, "updates_done": 0, "task_ids_seen": []}
def tensors():
    g = torch.Generator().manual_seed(0)
    return {"inputs": torch.rand(items, 3, 32, 32, generator=g), "targets": torch.randint(0, 10, (items,), generator=g),
            "metadata.logits": torch.randn(items, 10, generator=g)}
def start():  # resets the peak RSS to the current RSS; returns (RSS now, clock now)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss(), time.perf_counter()
if op in ("write", "raw"):
    t = tensors()
    size = sum(v.numel() * v.element_size() for v in t.values())
    before, started = start()
    if op == "write":
        write_state(folder, manifest, {"memory.json": {"items": items}}, {"memory.safetensors": t})
    else:
        folder.mkdir()
        path = folder / "memory.safetensors"
        save_file(t, str(path))
        fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
    seconds = time.perf_counter() - started
elif op == "memwrite":  # a real memory state, as an updater saves it
    from retain.memory import ReservoirMemory
    m = ReservoirMemory(items, seed=0)
    t = tensors()
    m.add(t["inputs"], t["targets"], {"logits": t["metadata.logits"]})
    meta, state = m.state_dict(copy=False)
    del t, m
    size, seconds, before = 0, 0.0, rss()
    write_state(folder, manifest, {"memory.json": meta}, {"memory.safetensors": state})
elif op == "memload":  # read into the memory's columns, as an updater loads it
    from retain.memory import ReservoirMemory
    def load(where, n):
        state = StateFolder(where)
        m = ReservoirMemory(n, seed=0)
        meta = state.json("memory.json")
        t = state.tensors("memory.safetensors", into=m.load_buffers(meta, state.tensor_header("memory.safetensors")))
        m.load_state_dict(meta, t, num_classes=10)
        return m
    if len(sys.argv) > 4:  # warm: the same path first loads a 2-item memory (torch's code pages faulted in)
        load(Path(sys.argv[4]), 2)
    size = (folder / "memory.safetensors").stat().st_size
    before, started = start()
    m = load(folder, items)
    seconds = time.perf_counter() - started
else:
    size = (folder / "memory.safetensors").stat().st_size
    before, started = start()
    state = StateFolder(folder)
    t = state.tensors("memory.safetensors")
    del state
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "bytes": size, "peak_extra": peak() - before}))
"""


def run(op: str, items: int, folder: Path, *extra: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CHILD, op, str(items), str(folder), *map(str, extra)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cells(items: int, where: str | None) -> dict[str, dict]:
    """One measurement of every cell of a row, each in a fresh process."""
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        base = Path(tmp)
        cells = {"raw": run("raw", items, base / "raw"), "write": run("write", items, base / "state")}
        cells["read"] = run("read", items, base / "state")
        run("memwrite", items, base / "memory")
        run("memwrite", 2, base / "warm")
        cells["load"] = run("memload", items, base / "memory")
        cells["warm"] = run("memload", items, base / "memory", base / "warm")
    return cells


def _median(runs: list[dict[str, dict]], cell: str, key: str) -> float:
    return statistics.median(r[cell][key] for r in runs)


def state_io_rows(items_list: list[int], where: str | None = None, repeats: int = 5) -> list[str]:
    """The state I/O table as markdown lines, one row per memory size: medians of ``repeats``
    measurements, the cells of one measurement run one after the other (each in a fresh process)."""
    lines = [
        "State I/O: a DER memory state (float32 3x32x32 inputs, int64 targets, 10 logits) written and read by "
        f"retain beside a raw safetensors save + fsync, each in a fresh process, medians of {repeats} runs",
        "",
        "| memory items | state MB | write s (MB/s) | raw safetensors save + fsync s | write / raw speed "
        "| write peak extra | read s (MB/s) | read peak extra | load into a ReservoirMemory s | its peak extra "
        "| same, after a 2-item load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for items in items_list:
        runs = [_cells(items, where) for _ in range(repeats)]
        size = runs[0]["write"]["bytes"]
        mb = size / 1e6
        write, raw, read = (_median(runs, c, "seconds") for c in ("write", "raw", "read"))
        speed = statistics.median(r["raw"]["seconds"] / r["write"]["seconds"] for r in runs)
        lines.append(
            f"| {items:,} | {mb:,.0f} | {write:.3f} ({mb / write:,.0f}) | {raw:.3f} | {speed:.0%} "
            f"| {_median(runs, 'write', 'peak_extra') / size:.2f}x | {read:.3f} ({mb / read:,.0f}) "
            f"| {_median(runs, 'read', 'peak_extra') / size:.2f}x | {_median(runs, 'load', 'seconds'):.3f} "
            f"| {_median(runs, 'load', 'peak_extra') / runs[0]['load']['bytes']:.2f}x "
            f"| {_median(runs, 'warm', 'peak_extra') / runs[0]['warm']['bytes']:.2f}x |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1000, 10000, 50000, 200000])
    p.add_argument("--repeats", type=int, default=5, help="measurements per row; the table shows medians")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    print("\n".join(state_io_rows(args.items, args.dir, args.repeats)))


if __name__ == "__main__":
    main()
