"""Dict-input and tuple-input datasets through every updater, with state round trips in a new process.

Each method trains a plain ``nn.Module`` (``forward(x, aux)``, so ``m(**dict)`` and ``m(*tuple)``)
on chunk 0 here; a subprocess then restores every state folder, checks nothing was lost (served
logits, memory items), runs chunk 1 and reloads the result with ``load_model(folder, model=fresh)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import retain
from retain import nested

sys.path.insert(0, str(Path(__file__).parent))
import workloads_support as ws

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"


@pytest.mark.parametrize("kind", ws.KINDS)
def test_every_updater_takes_nested_inputs_and_its_state_continues_in_a_new_process(kind: str, tmp_path: Path):
    parent: dict[str, dict[str, torch.Tensor]] = {}
    for method in ws.METHODS:
        updater = ws.updater(method, None, tmp_path / f"{method}-{kind}-1")
        served = updater.update(ws.dataset(kind, 0))
        assert isinstance(served, ws.TwoInputNet), f"{method}: update returns the user's own module"
        record = {"logits": nested.call_model(served, ws.probe(kind)).detach()}
        memory = updater.learner.memory_for_state()
        if memory is not None:
            inputs, targets, metadata = memory.raw_items()
            assert nested.structure(inputs) == nested.structure(ws.probe(kind)), method
            record.update({f"memory.inputs.{p}": leaf.clone() for p, leaf in nested.leaves(inputs)})
            record["memory.targets"] = targets.clone()
            record.update({f"memory.metadata.{k}": v.clone() for k, v in metadata.items()})
        parent[method] = record
    # POD's features come from the hooked submodules, one column per layer
    assert parent["pod"]["memory.metadata.pod_flat_0"].shape[1:] == (16,)  # the output of `body`
    super_columns = {"memory.metadata.pod_flat_0", "memory.metadata.pod_flat_1", "memory.metadata.logits"}
    assert super_columns <= set(parent["super"])

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "_roundtrip_worker.py"), kind, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    worker = load_file(str(tmp_path / f"worker-{kind}.safetensors"))
    for method, record in parent.items():
        assert torch.equal(worker[f"{method}.restored_logits"], record["logits"]), f"{method}: weights changed"
        for key, value in record.items():
            if key.startswith("memory."):
                assert torch.equal(worker[f"{method}.{key}"], value), f"{method}: {key} changed in the round trip"
        assert not torch.equal(worker[f"{method}.second_logits"], record["logits"]), f"{method}: chunk 1 not trained"
        assert int(worker[f"{method}.updates_done"]) == 2, method


def test_a_plain_module_state_needs_a_fresh_module_and_refuses_a_different_one(tmp_path: Path):
    ws.updater("er", None, tmp_path / "s").update(ws.dataset("dict", 0))
    with pytest.raises(retain.StateError, match=r"plain nn.Module \(TwoInputNet\).*model=TwoInputNet"):
        retain.load_model(tmp_path / "s")
    other = ws.TwoInputNet()
    other.head = torch.nn.Linear(16, 5)
    shapes = r"tensor 'head\.(weight|bias)' is torch.float32 \(4(, 16)?,?\), the model needs torch.float32 \(5"
    with pytest.raises(retain.StateError, match=shapes):
        retain.load_model(tmp_path / "s", model=other)
    with pytest.raises(retain.StateError, match=r"holds a TwoInputNet .* model given is a Linear"):
        retain.load_model(tmp_path / "s", model=torch.nn.Linear(12, 4))
    with pytest.raises(retain.StateError, match=r"holds a TwoInputNet .* model given is a Linear"):
        ws.updater("er", None, None).__class__(
            torch.nn.Linear(12, 4), optimizer=torch.optim.SGD, memory_size=20, input_state_folder=tmp_path / "s"
        )
