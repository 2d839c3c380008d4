"""OS errors on the state path reach the terminal as one line naming the path and the cause, and
leave nothing half-written (issue: safe output paths, finding 7)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import retain.state
from retain.cli import main

CONFIG = '''
import torch
from torch.utils.data import TensorDataset
import retain

METHOD = "er"
UPDATER_OPTIONS = {"memory_size": 20, "batch_size": 8, "max_epochs": 1, "progress_bar": False}

def model_fn():
    return retain.MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=[8])

def train_dataset_fn():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(24, 4, generator=g), torch.arange(24) % 3)

test_dataset_fn = train_dataset_fn
'''


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG)
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_a_failing_write_is_one_line_and_leaves_nothing(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int,
    cause: str,
) -> None:  # fmt: skip
    def failing_write(path: Path, chunks):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(retain.state, "write_file", failing_write)
    out = tmp_path / "state"
    assert main(["update", "--config", str(config), "--output-state", str(out)]) == 2
    err = _one_line_error(capsys)
    assert cause in err and ".state.tmp-" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.py"]  # no state, no temporary, no lock


def test_a_name_too_long_is_one_line(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["update", "--config", str(config), "--output-state", str(tmp_path / ("s" * 300))]) == 2
    assert "File name too long" in _one_line_error(capsys)


def test_a_file_as_parent_is_one_line(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["update", "--config", str(config), "--output-state", str(config / "state")]) == 2
    assert "cfg.py is a file, not a folder" in _one_line_error(capsys)
    assert config.read_text() == CONFIG


def test_dangling_symlinks_are_one_line(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert main(["update", "--config", str(config), "--output-state", str(tmp_path / "out")]) == 2
    assert "it is a symbolic link" in _one_line_error(capsys)
    (tmp_path / "in").symlink_to(tmp_path / "nowhere")
    assert main(["update", "--config", str(config), "--input-state", str(tmp_path / "in"), "--output-state",
                 str(tmp_path / "next")]) == 2  # fmt: skip
    assert "state folder" in _one_line_error(capsys) and not (tmp_path / "nowhere").exists()


def test_an_input_through_a_symlink_to_a_state_folder_works(tmp_path: Path, config: Path) -> None:
    assert main(["update", "--config", str(config), "--output-state", str(tmp_path / "v1")]) == 0
    (tmp_path / "latest").symlink_to(tmp_path / "v1")
    assert main(["update", "--config", str(config), "--input-state", str(tmp_path / "latest"), "--output-state",
                 str(tmp_path / "v2")]) == 0  # fmt: skip


def test_evaluate_of_a_missing_state_is_one_line_in_a_real_process(tmp_path: Path, config: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "retain.cli", "evaluate", "--config", str(config), "--state", str(tmp_path / "gone")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "gone does not exist" in proc.stderr
