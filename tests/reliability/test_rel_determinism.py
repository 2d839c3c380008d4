"""Determinism: same seed, same data, CPU -> bit-identical state folders, in separate processes.

One run is a brand-new interpreter with its own hash seed, the other a child forked from the
test's fork server: every file of both state folders must have the same bytes, for two
consecutive updates (the second continuing from the first's folder) of Super-ER (every
component, generator and memory column) and of joint training. The manifest holds no
timestamps, and the options' callables are recorded without memory addresses.

What is and is not deterministic on a GPU is documented in ``retain.updaters.base.deterministic``:
``deterministic_trainer=True`` turns on ``torch.use_deterministic_algorithms`` for the update,
which the last tests check (the GPU one runs only where CUDA is available).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rel_support import build_updater, fork_server, run_fresh_process, snapshot, synthetic_data

JOBS = [("super", "t0"), ("super", "t1"), ("joint", "t0"), ("joint", "t1")]


def _jobs(root: Path) -> list[dict[str, Any]]:
    jobs = []
    for method, task_id in JOBS:
        first = task_id == "t0"
        jobs.append(
            {
                "method": method,
                "items": 64,
                "epochs": 2,
                "task_id": task_id,
                "data_seed": 11 if first else 12,
                "input": None if first else str(root / f"{method}-t0"),
                "output": str(root / f"{method}-{task_id}"),
            }
        )
    return jobs


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _walk(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _walk(v, f"{path}[{i}]")]
    return [(path, value)]


@pytest.mark.slow
def test_same_seed_gives_identical_state_folders_in_separate_processes(tmp_path: Path) -> None:
    fresh_root, forked_root = tmp_path / "fresh", tmp_path / "forked"
    fresh = run_fresh_process({"jobs": _jobs(fresh_root)}, env={"PYTHONHASHSEED": "12345"})
    server = fork_server()
    for job in _jobs(forked_root):
        run = server.run(**job)
        assert run.wait() == 0, server.stderr_tail()
    _, stderr = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, stderr.decode()[-3000:]
    for method, task_id in JOBS:
        a, b = snapshot(fresh_root / f"{method}-{task_id}"), snapshot(forked_root / f"{method}-{task_id}")
        assert set(a) >= {"manifest.json", "model.safetensors", "learner.json", "learner.safetensors"}
        assert a == b, f"{method} {task_id}: files differ: {sorted(k for k in a if a[k] != b.get(k))}"
    manifest = json.loads((fresh_root / "super-t1" / "manifest.json").read_text())
    leaves = _walk(manifest)
    volatile = re.compile(r"(^|_)(time|timestamp|date|created|modified|host|hostname|pid|user)(_|$)")
    assert not [p for p, _ in leaves if any(volatile.search(part) for part in re.split(r"[.\[\]]", p.lower()))]
    assert not [p for p, v in leaves if isinstance(v, str) and re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}", v)]
    assert manifest["options"]["train_transform"] == "<function scale_inputs>"
    assert not [p for p, v in leaves if isinstance(v, str) and " at 0x" in v], "a memory address was recorded"


class _FlagLogger:
    """A logger that records whether deterministic algorithms are on when metrics are logged."""

    def __init__(self) -> None:
        self.flags: list[bool] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.flags.append(torch.are_deterministic_algorithms_enabled())


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_trainer_switches_deterministic_algorithms_for_the_update(
    deterministic: bool, tmp_path: Path
) -> None:
    logger = _FlagLogger()
    options = {"deterministic_trainer": deterministic, "logger": logger, "log_every_n_steps": 1}
    updater = build_updater(
        {"method": "der", "items": 32, "epochs": 1, "output": str(tmp_path / "s"), "options": options}
    )
    before = torch.are_deterministic_algorithms_enabled()
    updater.update(synthetic_data(11, 32), task_id="t0")
    assert logger.flags and set(logger.flags) == {deterministic or before}
    assert torch.are_deterministic_algorithms_enabled() == before, "the global switch was not restored"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_updates_are_bit_identical_with_deterministic_trainer(tmp_path: Path) -> None:
    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        options = {"accelerator": "cuda", "deterministic_trainer": True}
        build_updater({"method": "super", "items": 64, "epochs": 2, "output": str(out), "options": options}).update(
            synthetic_data(11, 64), task_id="t0"
        )
        files.append(snapshot(out))
        shutil.rmtree(out)
    assert files[0] == files[1]
