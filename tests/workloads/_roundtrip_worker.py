"""Subprocess side of test_workload_updaters: continues every method's state in a new process.

    python _roundtrip_worker.py KIND ROOT

For each method: builds the updater from ROOT/<method>-<kind>-1, records what it restored (the
served model's logits on the probe batch, the memory's items), runs the second update into
ROOT/<method>-<kind>-2 and records the reloaded second state's logits, all into
ROOT/worker-<kind>.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import retain
from retain import nested

sys.path.insert(0, str(Path(__file__).parent))
import workloads_support as ws


def main(kind: str, root: Path) -> None:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    for method in ws.METHODS:
        first, second = root / f"{method}-{kind}-1", root / f"{method}-{kind}-2"
        restored = retain.load_model(first, model=ws.fresh_model())
        out[f"{method}.restored_logits"] = nested.call_model(restored, ws.probe(kind)).contiguous()
        updater = ws.updater(method, first, second)
        memory = updater.learner.memory_for_state()
        if memory is not None:
            inputs, targets, metadata = memory.raw_items()
            for path, leaf in nested.leaves(inputs):
                out[f"{method}.memory.inputs.{path}"] = leaf.clone()
            out[f"{method}.memory.targets"] = targets.clone()
            for name, column in metadata.items():
                out[f"{method}.memory.metadata.{name}"] = column.clone()
        updater.update(ws.dataset(kind, 1))
        reloaded = retain.load_model(second, model=ws.fresh_model())
        out[f"{method}.second_logits"] = nested.call_model(reloaded, ws.probe(kind)).contiguous()
        out[f"{method}.updates_done"] = torch.tensor(updater.learner.updates_done)
    save_file(out, str(root / f"worker-{kind}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
