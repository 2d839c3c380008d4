"""The fixed costs of an update: Joint's and DER's per-update state overhead, and the first update.

Tables (each a function, printed by ``main``):

1. ``overhead_table``: DER and Joint over ``--updates`` small updates (``--items`` float32
   3x32x32 items each), every update a new updater built from the previous state folder, in one
   process: seconds to load the state (updater construction: verification + restore), to save it,
   the state's size, and the disk bytes each update adds (files not shared with the previous
   state), as medians of updates 2-6 and of the last five; plus the load of state N-1 in a fresh
   process, where no file has been verified yet (Joint hashes every chunk there); and Joint's
   update 2 and last update alternated ``--rounds`` times (paired load+save ratio: on a shared
   machine the load drifts between update 2 and update 50 of the consecutive run).
2. ``fresh_table``: Joint's update 2 and update ``--updates`` each in a fresh process, where every
   chunk is hashed: load, ``update()`` (training, then the wait for the background verification),
   save and whole-process wall, with the chunks verified at load (the sequential path) and while
   training (the default); medians of ``--repeats`` interleaved runs.
3. ``first_update_table``: in fresh processes, the first and the second 10-step update (digits,
   DER++, each from the same input state: updater construction + update + save); medians.
4. ``cli_wall_table``: whole-process wall of ``retain update`` (a 10-step update of
   examples/digits_config.py) and, with ``--mnist-dir``, of ``retain benchmark --method er
   --dataset mnist`` (the DER paper's Split-MNIST protocol); medians of ``--repeats`` runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_joint.py [--updates 50] [--items 1000]
        [--repeats 3] [--rounds 9] [--mnist-dir ../shared/data] [--tables overhead fresh first cli]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from retain import DarkExperienceReplayModelUpdater, JointModelUpdater, ModelUpdater, MultiLayerPerceptron

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)


def _chunk(k: int, items: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1000 + k)
    return TensorDataset(torch.rand(items, *SHAPE, generator=g), torch.randint(0, 10, (items,), generator=g))


def _updater(method: str, input_folder: Path | None) -> ModelUpdater:
    model = MultiLayerPerceptron(num_inputs=3 * 32 * 32, num_outputs=10, hidden_sizes=[32])
    optimizer = functools.partial(torch.optim.SGD, lr=0.01)
    common: dict[str, Any] = {"max_epochs": 1, "seed": 0, "accelerator": "cpu", "input_state_folder": input_folder}
    if method == "joint":
        return JointModelUpdater(model, optimizer=optimizer, batch_size=500, **common)
    return DarkExperienceReplayModelUpdater(
        model, optimizer=optimizer, memory_size=1000, alpha=0.3, beta=0.5, batch_size=100, memory_batch_size=100,
        **common,
    )  # fmt: skip


def _disk_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def per_update_overhead(method: str, updates: int, items: int, work: Path) -> list[dict[str, float]]:
    """One row per update: load_s, train_s, save_s, state_mb (apparent size), new_disk_mb (disk bytes
    of the files not shared with the previous state)."""
    rows: list[dict[str, float]] = []
    previous: Path | None = None
    for k in range(updates):
        started = time.perf_counter()
        updater = _updater(method, previous)
        loaded = time.perf_counter()
        updater.update(_chunk(k, items))
        trained = time.perf_counter()
        out = work / f"{method}{k:03d}"
        updater.save_state(out)
        saved = time.perf_counter()
        # A state can share files with the previous state only (Joint's links all point into it).
        shared = {(p.stat().st_dev, p.stat().st_ino) for p in previous.iterdir()} if previous is not None else set()
        new = sum(_disk_bytes(p) for p in out.iterdir() if (p.stat().st_dev, p.stat().st_ino) not in shared)
        rows.append({
            "update": k + 1, "load_s": loaded - started, "train_s": trained - loaded, "save_s": saved - trained,
            "state_mb": sum(p.stat().st_size for p in out.iterdir()) / 1e6, "new_disk_mb": new / 1e6,
        })  # fmt: skip
        if method != "joint" and previous is not None:
            shutil.rmtree(previous)  # DER states share nothing: keep the disk use bounded
        previous = out
    return rows


def interleaved_load_save(folders: dict[int, Path], items: int, rounds: int, work: Path) -> dict[int, list[float]]:
    """Load+save seconds of Joint update ``k`` from ``folders[k]`` (state ``k - 1``), the updates
    alternated ``rounds`` times in this process (training is not timed), so that both see the same
    machine load: paired figures for a shared machine, where consecutive updates drift with it."""
    seconds: dict[int, list[float]] = {k: [] for k in folders}
    for _ in range(rounds):
        for k, folder in folders.items():
            started = time.perf_counter()
            updater = _updater("joint", folder)
            loaded = time.perf_counter()
            updater.update(_chunk(k - 1, items))
            trained = time.perf_counter()
            out = work / "interleaved"
            updater.save_state(out)
            seconds[k].append(loaded - started + time.perf_counter() - trained)
            shutil.rmtree(out)
    return seconds


_FRESH_LOAD = """
import sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
from scale_joint import _updater
from pathlib import Path
started = time.perf_counter()
_updater({method!r}, Path({folder!r}))
print(time.perf_counter() - started)
"""


def fresh_process_load(method: str, folder: Path) -> float:
    """Seconds to build the updater from ``folder`` in a new process (nothing verified before)."""
    program = _FRESH_LOAD.format(bench=str(Path(__file__).parent), method=method, folder=str(folder))
    out = subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _median_row(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Per-column medians of consecutive updates (one update's seconds are noisy on a shared machine)."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "update"}
    out["update"] = f"{rows[0]['update']}-{rows[-1]['update']}" if len(rows) > 1 else str(rows[0]["update"])
    return out


def overhead_table(updates: int, items: int, rounds: int = 9) -> str:
    lines = [
        f"DER and Joint, {updates} updates of {items} float32 3x32x32 items each (one process, each update a new "
        "updater on the previous state folder):",
        "",
        "| method | updates (medians) | load s | save s | load+save s | train s | state MB | new disk MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    with tempfile.TemporaryDirectory(prefix="retain-scale-joint-") as tmp:
        for method in ("der", "joint"):
            rows = per_update_overhead(method, updates, items, Path(tmp))
            span = max(1, min(5, (updates - 1) // 2))
            early, late = _median_row(rows[1 : 1 + span]), _median_row(rows[-span:])
            for row in (early, late):
                lines.append(
                    f"| {method} | {row['update']} | {row['load_s']:.3f} | {row['save_s']:.3f} | "
                    f"{row['load_s'] + row['save_s']:.3f} | {row['train_s']:.2f} | {row['state_mb']:.1f} | "
                    f"{row['new_disk_mb']:.1f} |"
                )
            ratio = (late["load_s"] + late["save_s"]) / (early["load_s"] + early["save_s"])
            extra.append(
                f"- {method}: load+save of updates {late['update']} = {ratio:.2f}x that of updates {early['update']}"
            )
            if method == "joint":
                inodes = {(p.stat().st_ino, _disk_bytes(p)) for f in Path(tmp).glob("joint*") for p in f.iterdir()}
                disk = sum(size for _, size in inodes) / 1e6
                apparent = sum(r["state_mb"] for r in rows)
                extra.append(f"- joint: the {updates} states take {disk:.0f} MB of disk ({apparent:.0f} MB apparent)")
                folder = Path(tmp) / f"joint{updates - 2:03d}"
                pairs = interleaved_load_save({2: Path(tmp) / "joint000", updates: folder}, items, rounds, Path(tmp))
                ratios = [b / a for a, b in zip(pairs[2], pairs[updates], strict=True)]
                extra.append(
                    f"- joint, interleaved ({rounds} rounds of update 2, then {updates}, same process): load+save "
                    f"{statistics.median(pairs[2]):.3f} s vs {statistics.median(pairs[updates]):.3f} s, median paired "
                    f"ratio {statistics.median(ratios):.2f}x"
                )
                fresh = statistics.median(fresh_process_load("joint", folder) for _ in range(3))
                extra.append(
                    f"- joint: loading state {updates - 1} in a fresh process (every chunk hashed): {fresh:.3f} s "
                    f"vs {rows[-1]['load_s']:.3f} s in the process that verified its earlier chunks (update {updates})"
                )
    return "\n".join([*lines, "", *extra])


_FRESH_UPDATE = """
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from retain import JointModelUpdater
from scale_joint import _chunk, _updater
JointModelUpdater.verify_chunks_in_background = {background!r}
started = time.perf_counter()
updater = _updater("joint", Path({folder!r}))
loaded = time.perf_counter()
updater.update(_chunk({k!r}, {items!r}))  # returns once the background verification is joined
trained = time.perf_counter()
updater.save_state(Path({out!r}))
saved = time.perf_counter()
print(json.dumps({{"load_s": loaded - started, "update_s": trained - loaded, "save_s": saved - trained,
                  "whole_s": saved - started}}))
"""


def fresh_process_update(folder: Path, out: Path, k: int, items: int, background: bool) -> dict[str, float]:
    """One Joint update from ``folder`` (state ``k``) in a new process: seconds of the load (updater
    construction), of ``update`` (training, then waiting for the chunks' verification), of the save,
    of the three together, and the whole process's wall time (interpreter and imports included)."""
    program = _FRESH_UPDATE.format(
        bench=str(Path(__file__).parent), background=background, folder=str(folder), k=k, items=items, out=str(out)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, text=True, env=env)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - started
    shutil.rmtree(out)
    return row


def fresh_table(updates: int, items: int, repeats: int) -> str:
    """Joint's update 2 and update ``updates`` in fresh processes (nothing hashed before in the
    process), the chunks verified at load (``verify_chunks_in_background = False``, the sequential
    path) and while training (the default); medians of ``repeats`` interleaved runs."""
    lines = [
        f"Joint in fresh processes: update 2 and update {updates} ({items} float32 3x32x32 items per update), "
        f"every chunk of the input state hashed in the process; medians of {repeats} interleaved runs:",
        "",
        "| chunks verified | update | load s | update() s (train + wait) | save s | load+update+save s "
        "| process wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="retain-scale-fresh-") as tmp:
        per_update_overhead("joint", updates - 1, items, Path(tmp))  # states joint000 ... (updates - 2)
        cells: dict[tuple[bool, int], list[dict[str, float]]] = {}
        for _ in range(repeats):
            for update in (2, updates):
                for background in (False, True):
                    folder = Path(tmp) / f"joint{update - 2:03d}"
                    row = fresh_process_update(folder, Path(tmp) / "out", update - 1, items, background)
                    cells.setdefault((background, update), []).append(row)
    for background in (False, True):
        for update in (2, updates):
            rows = cells[(background, update)]
            m = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
            how = "while training (background)" if background else "at load (sequential)"
            lines.append(
                f"| {how} | {update} | {m['load_s']:.3f} | {m['update_s']:.3f} | {m['save_s']:.3f} "
                f"| {m['whole_s']:.3f} | {m['process_s']:.2f} |"
            )
    return "\n".join(lines)


_TWO_UPDATES = """
import functools, sys, time
import torch
torch.set_num_threads(1)
import retain
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset
digits = load_digits()
x = torch.tensor(digits.images[:100], dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target[:100])
def make(folder, out):
    return retain.DarkExperienceReplayModelUpdater(
        retain.MultiLayerPerceptron(num_inputs=64, num_outputs=10, hidden_sizes=[100, 100]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05), memory_size=200, alpha=0.3, beta=0.5,
        loss_normalization=0, batch_size=10, max_epochs=1, seed=0, input_state_folder=folder,
        output_state_folder=out)
work = sys.argv[1]
if sys.argv[2] == "prepare":
    make(None, work + "/s0").update(TensorDataset(x, y))
    raise SystemExit
times = []
for i in range(2):
    started, cpu = time.perf_counter(), time.process_time()
    make(work + "/s0", work + f"/s{{i + 1}}").update(TensorDataset(x, y))
    times += [time.perf_counter() - started, time.process_time() - cpu]
print(*times)
"""


def first_update_table(repeats: int) -> str:
    """First vs second 10-step update in fresh processes (construction + update + save)."""
    firsts, seconds, first_cpu, second_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="retain-first-") as tmp:
        program = textwrap.dedent(_TWO_UPDATES)
        subprocess.run([sys.executable, "-c", program, tmp, "prepare"], check=True)
        for _ in range(repeats):
            for name in ("s1", "s2"):
                shutil.rmtree(Path(tmp) / name, ignore_errors=True)
            out = subprocess.run([sys.executable, "-c", program, tmp, "run"], check=True, capture_output=True,
                                 text=True)  # fmt: skip
            first, cpu1, second, cpu2 = map(float, out.stdout.split())
            firsts.append(first)
            seconds.append(second)
            first_cpu.append(cpu1)
            second_cpu.append(cpu2)
    f, s = statistics.median(firsts), statistics.median(seconds)
    fc, sc = statistics.median(first_cpu), statistics.median(second_cpu)
    return "\n".join([
        f"First vs second update in a fresh process (DER++, digits, 10 steps each, construction + update + save; "
        f"medians of {repeats} processes; CPU = the process's CPU time during the update):",
        "",
        "| first update s | second update s | difference s | first CPU s | second CPU s |",
        "|---|---|---|---|---|",
        f"| {f:.3f} | {s:.3f} | {f - s:+.3f} | {fc:.3f} | {sc:.3f} |",
    ])  # fmt: skip


_UPDATE_CONFIG = """
import sys
sys.path.insert(0, {examples!r})
from digits_config import *  # noqa: F403
from digits_config import _digits
from torch.utils.data import TensorDataset
UPDATER_OPTIONS = {{**UPDATER_OPTIONS, "max_epochs": 1, "progress_bar": False}}
def train_dataset_fn():
    x, y = _digits()
    return TensorDataset(x[:100], y[:100])  # 10 steps of batch 10
"""


def _wall(argv: list[str], repeats: int, before: Any = None) -> tuple[float, float]:
    """Medians of the whole-process wall time and CPU time (user + sys) of ``argv``."""
    walls, cpus = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def cli_wall_table(repeats: int, mnist_dir: Path | None) -> str:
    cli = [sys.executable, "-m", "retain.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="retain-cli-wall-") as tmp:
        config = Path(tmp) / "config10.py"
        config.write_text(_UPDATE_CONFIG.format(examples=str(REPO / "examples")))
        subprocess.run([*cli, "update", "--config", str(config), "--output-state", f"{tmp}/s0"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        argv = [*cli, "update", "--config", str(config), "--input-state", f"{tmp}/s0", "--output-state", f"{tmp}/s1"]
        wall, cpu = _wall(argv, repeats, before=lambda: shutil.rmtree(f"{tmp}/s1", ignore_errors=True))
        rows.append(f"| `retain update` (10-step DER++ update, examples/digits_config.py) | {wall:.2f} | {cpu:.2f} |")
        if mnist_dir is not None:
            argv = [*cli, "benchmark", "--method", "er", "--dataset", "mnist", "--data-dir", str(mnist_dir),
                    "--output", f"{tmp}/bench"]  # fmt: skip
            wall, cpu = _wall(argv, repeats)
            name = "`retain benchmark --method er --dataset mnist` (Split-MNIST, DER protocol)"
            rows.append(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    return "\n".join([
        f"Whole-process wall and CPU time (user + sys; medians of {repeats} runs):", "",
        "| command | wall s | CPU s |", "|---|---|---|", *rows,
    ])  # fmt: skip


TABLES = ("overhead", "fresh", "first", "cli")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=50)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of Joint's update 2 and last update")
    p.add_argument("--mnist-dir", type=Path, default=None, help="folder with mnist/ for the retain benchmark row")
    p.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES), help="which tables (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for table in args.tables:
        print()
        if table == "overhead":
            print(overhead_table(args.updates, args.items, args.rounds))
        elif table == "fresh":
            print(fresh_table(args.updates, args.items, args.repeats))
        elif table == "first":
            print(first_update_table(args.repeats))
        else:
            print(cli_wall_table(args.repeats, args.mnist_dir))


if __name__ == "__main__":
    main()
