"""DDP (devices=2, worker processes) with dict inputs and a plain nn.Module: sharding, the memory of
both ranks gathered into one state folder, and the plain module sent to the workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from retain.updaters import distributed

sys.path.insert(0, str(Path(__file__).parent))
import workloads_support as ws


@pytest.mark.parametrize("method", ["er", "derpp"])
def test_two_ranks_train_a_plain_module_on_dict_inputs_and_write_one_state(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = []
    real_spawn = distributed._spawn_update
    monkeypatch.setattr(distributed, "_spawn_update", lambda *a: spawned.append(1) or real_spawn(*a))
    updater = ws.updater(method, None, tmp_path / "s")
    updater.options.devices = 2
    served = updater.update(ws.dataset("dict", 0))
    assert spawned == [1], "the update ran in two worker processes"
    assert isinstance(served, ws.TwoInputNet)
    memory = updater.learner.memory
    assert memory.seen == 2 * 48, "both ranks' items counted over 2 epochs"
    assert len(memory) == 20 and set(memory.raw_items()[0]) == {"x", "aux"}
    stored = {tuple(row.tolist()) for row in memory.raw_items()[0]["x"]}
    assert stored <= {tuple(row.tolist()) for row in ws.dataset("dict", 0).x}
    again = ws.updater(method, tmp_path / "s", None)  # the state written by rank 0 loads on one device
    assert len(again.learner.memory) == 20 and again.learner.updates_done == 1
