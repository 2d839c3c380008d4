"""State I/O at scale: write and read seconds, MB/s and peak extra RSS of a replay memory's state
beside a raw safetensors save + fsync of the same tensors, each measured in a fresh process.

    .venv/bin/python benchmarks/scale_state.py --items 1000 10000 50000 200000

Items are float32 3x32x32 inputs with int64 targets and 10 float32 logits (DER's memory). "Peak
extra" is the process's peak RSS minus its RSS before the operation (with the tensors already
in memory for writes), divided by the state's size: the issue's target is <= 1.3 for both.
"""

from __future__ import annotations

import argparse
import json
import os
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
    size = (folder / "memory.safetensors").stat().st_size
    before, started = start()
    state = StateFolder(folder)
    m = ReservoirMemory(items, seed=0)
    meta = state.json("memory.json")
    t = state.tensors("memory.safetensors", into=m.load_buffers(meta, state.tensor_header("memory.safetensors")))
    m.load_state_dict(meta, t, num_classes=10)
    del t, state
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


def run(op: str, items: int, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, op, str(items), str(folder)], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def state_io_rows(items_list: list[int], where: str | None = None) -> list[str]:
    """The state I/O table as markdown lines, one row per memory size."""
    lines = [
        "State I/O: a DER memory state (float32 3x32x32 inputs, int64 targets, 10 logits) written and read by "
        "retain beside a raw safetensors save + fsync, each in a fresh process",
        "",
        "| memory items | state MB | write s (MB/s) | raw safetensors save + fsync s | write / raw speed "
        "| write peak extra | read s (MB/s) | read peak extra | load into a ReservoirMemory s | its peak extra |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for items in items_list:
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            raw = run("raw", items, Path(tmp) / "raw")
            write = run("write", items, Path(tmp) / "state")
            read = run("read", items, Path(tmp) / "state")
            run("memwrite", items, Path(tmp) / "memory")
            load = run("memload", items, Path(tmp) / "memory")
        mb = write["bytes"] / 1e6
        lines.append(
            f"| {items:,} | {mb:,.0f} | {write['seconds']:.2f} ({mb / write['seconds']:,.0f}) | {raw['seconds']:.2f} "
            f"| {raw['seconds'] / write['seconds']:.0%} | {write['peak_extra'] / write['bytes']:.2f}x "
            f"| {read['seconds']:.2f} ({mb / read['seconds']:,.0f}) | {read['peak_extra'] / read['bytes']:.2f}x "
            f"| {load['seconds']:.2f} | {load['peak_extra'] / load['bytes']:.2f}x |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1000, 10000, 50000, 200000])
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    print("\n".join(state_io_rows(args.items, args.dir)))


if __name__ == "__main__":
    main()
