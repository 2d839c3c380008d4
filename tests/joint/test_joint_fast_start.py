"""The first optimizer of a process does not import torch._dynamo (about 1 s of start-up), and
optimizers behave exactly as torch's own wrappers make them behave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROGRAM = """
import json, sys
import torch
torch.set_num_threads(1)
if {dynamo_first}:
    import torch._dynamo
import retain
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
grad_mode_in_step = []
out = {{}}
for name, make in [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01)),
]:
    optimizer = make(model.parameters())
    optimizer.register_step_pre_hook(lambda *a: grad_mode_in_step.append(torch.is_grad_enabled()))
    for step in range(3):
        x = torch.randn(8, 5)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)
    out[name] = [p.detach().flatten().tolist() for p in model.parameters()]
out["grad_mode_after"] = torch.is_grad_enabled()
out["dynamo_imported"] = "torch._dynamo" in sys.modules
print(json.dumps(out))
"""


def _run(dynamo_first: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM.format(dynamo_first=dynamo_first)],
        check=True, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_optimizers_work_without_importing_dynamo_and_match_torchs_own_path() -> None:
    lazy, reference = _run(dynamo_first=False), _run(dynamo_first=True)
    assert lazy["dynamo_imported"] is False, "the first optimizer step imported torch._dynamo"
    assert reference["dynamo_imported"] is True
    for name in ("sgd", "adam", "adamw"):
        assert lazy[name] == reference[name], f"{name} parameters differ from torch's own path"
    assert lazy["grad_mode_after"] is True


def test_a_retain_update_process_never_imports_dynamo(tmp_path) -> None:
    program = f"""
import functools, sys, torch
torch.set_num_threads(1)
import retain
from torch.utils.data import TensorDataset
x, y = torch.rand(40, 64), torch.arange(40) % 10
for cls, kw in [(retain.ExperienceReplayModelUpdater, {{"memory_size": 20}}), (retain.JointModelUpdater, {{}})]:
    cls(retain.MultiLayerPerceptron(64, 10, [16]), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        output_state_folder={str(tmp_path)!r} + "/" + cls.__name__, batch_size=10, max_epochs=1, **kw
    ).update(TensorDataset(x, y), val_dataset=TensorDataset(x, y))
print("torch._dynamo" in sys.modules)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "False"
