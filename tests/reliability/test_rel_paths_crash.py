"""Fault injection against the output-path rules: an update that replaces an existing state is
SIGKILLed at seeded random moments while, in this process, readers load the output and second
writers try to write it. Readers get the old or the new complete state (or a one-line StateError
while a killed replacement left no folder); a second writer is refused at once while the first
holds the output (never both proceed); the input never changes. The counts are printed."""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rel_support import ForkServer, build_updater, fork_server, snapshot

from retain import load_model
from retain.state import StateError, StateFolder, StateLockedError

CHAINS = 10
SEED = 20261201
JOB: dict[str, Any] = {"method": "der", "epochs": 3, "items": 96, "slow_write": 0.02}


@pytest.fixture(scope="module")
def server() -> ForkServer:
    return fork_server()


def _weights_digest(model: torch.nn.Module) -> tuple[Any, ...]:
    return tuple((k, v.sum().item(), tuple(v.shape)) for k, v in sorted(model.state_dict().items()))


def test_readers_and_second_writers_while_a_replacement_is_killed(
    server: ForkServer, tmp_path: Path, capsys: Any
) -> None:
    rng = random.Random(SEED)
    inp, old, new = tmp_path / "input", tmp_path / "old", tmp_path / "new"
    for job in ({"output": inp, "task_id": "t0"}, {"input": inp, "output": old, "epochs": 1},
                {"input": inp, "output": new}):  # fmt: skip
        run = server.run(**{**JOB, **{k: str(v) if isinstance(v, Path) else v for k, v in job.items()}})
        assert run.wait() == 0, server.stderr_tail()
    input_files = snapshot(inp)
    known = {"old": _weights_digest(load_model(old)), "new": _weights_digest(load_model(new))}
    reads: Counter[str] = Counter()
    writers: Counter[str] = Counter()
    started = time.monotonic()
    for chain in range(CHAINS):
        out = tmp_path / f"out{chain}"
        shutil.copytree(old, out)  # the output already holds a complete (older) state: it is replaced
        run = server.run(**{**JOB, "input": str(inp), "output": str(out)})
        run.wait_for(lambda e: e["event"] in ("fit", "write"))
        finish = chain % 3 == 2  # every third writer is let finish: readers must then see the new state
        deadline, give_up = time.monotonic() + rng.uniform(0.05, 1.5), time.monotonic() + 60
        while time.monotonic() < give_up and (time.monotonic() < deadline or (finish and "new" not in reads)):
            try:
                digest = _weights_digest(load_model(out))
                outcome = next((name for name, d in known.items() if d == digest), "MIXED")
            except StateError as err:
                outcome = "absent" if "does not exist" in str(err) else f"refused: {err}"
            reads[outcome] += 1
            try:
                second = build_updater({**JOB, "input": str(inp), "output": str(out)})
            except StateLockedError:
                writers["refused at once (first writer holds the output)"] += 1
            else:  # the first writer had already finished: the output is free
                second.release_output_lock()
                writers["got the free output after the first ended"] += 1
            run.wait_for(lambda e: False, timeout=0.01)
        run.kill()
        assert snapshot(inp) == input_files, "the input state changed"
        if out.exists():
            StateFolder(out)
            assert snapshot(out) in (snapshot(old), snapshot(new)), "the output is neither the old nor the new state"
    with capsys.disabled():
        print(
            f"\n[path faults] {CHAINS} killed replacements ({time.monotonic() - started:.1f} s); reads of the "
            "output meanwhile: " + ", ".join(f"{k} {v}" for k, v in sorted(reads.items()))
            + "; second writers: " + ", ".join(f"{k} {v}" for k, v in sorted(writers.items()))
            + "; input unchanged after every kill"
        )  # fmt: skip
    assert set(reads) <= {"old", "new", "absent"}, reads
    assert reads["old"] > 0 and reads["new"] > 0, reads
    assert writers["refused at once (first writer holds the output)"] > 0, writers
