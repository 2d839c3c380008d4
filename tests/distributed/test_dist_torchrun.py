"""The README's multi-process path for real: ``torchrun --nproc_per_node 2 --no-python retain update``
run 10 times, each exiting 0 (no abort at exit) with a complete state folder. Skipped, with the
reason, where torchrun or the ``retain`` script is missing or torchrun cannot open its port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retain.state import StateFolder

BIN = Path(sys.executable).parent
RUNS = 10
CONFIG = """\
import torch
from torch.utils.data import TensorDataset
import retain
METHOD = "er"
UPDATER_OPTIONS = {"memory_size": 20, "batch_size": 8, "max_epochs": 1, "devices": 2, "accelerator": "cpu",
                   "progress_bar": False}
def model_fn():
    torch.manual_seed(0)
    return retain.MultiLayerPerceptron(num_inputs=4, num_outputs=2, hidden_sizes=[4])
def train_dataset_fn():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 4, generator=g), torch.arange(32) % 2)
"""


def _torchrun() -> tuple[Path, Path]:
    torchrun, retain_exe = BIN / "torchrun", BIN / "retain"
    if not torchrun.exists() or not retain_exe.exists():
        pytest.skip(f"torchrun or the retain script is not installed next to {sys.executable}")
    return torchrun, retain_exe


@pytest.mark.slow  # ~5 s per run on an idle 2-core machine, minutes when it is shared
@pytest.mark.timeout(600)
def test_torchrun_two_processes_exit_cleanly_ten_times(tmp_path: Path) -> None:
    torchrun, retain_exe = _torchrun()
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    started = time.perf_counter()
    codes = []
    for run in range(RUNS):
        out = tmp_path / "state"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29_600 + run), "--no-python",
             str(retain_exe), "update", "--config", str(config), "--output-state", str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        port_taken = "Address already in use" in proc.stderr or "errno: 98" in proc.stderr
        if run == 0 and proc.returncode != 0 and port_taken:
            pytest.skip(f"torchrun cannot start here: {proc.stderr.strip().splitlines()[-1]}")
        codes.append(proc.returncode)
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
        assert StateFolder(out).manifest["updates_done"] == 1
    assert codes == [0] * RUNS
    print(f"{RUNS} torchrun updates in {time.perf_counter() - started:.1f} s")
