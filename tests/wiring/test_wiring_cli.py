"""`retain update` and `retain evaluate` end to end from a config file, in fresh processes.

The config's options, optimizer, loss, task id and METHOD must reach the update (read back from
the state folder it writes); `retain evaluate` must score the saved model on the config's test
data through the config's ``TEST_TRANSFORM``; user errors end with exit status 2 and one line
naming the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import retain
from retain.cli import main

REPO = Path(__file__).resolve().parents[2]
SRC = Path(retain.__file__).resolve().parents[1]  # the retain under test (a mutation run's copy, too)

CONFIG = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset

    import retain

    METHOD = {method!r}
    UPDATER_OPTIONS = {options!r}
    TASK_ID = "t1"


    def _blobs(seed, n):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 3
        return TensorDataset(torch.randn(n, 4, generator=g) + 3.0 * y[:, None].float(), y)


    def model_fn():
        torch.manual_seed(0)
        return retain.MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=[8])


    def optimizer_fn(params):
        return torch.optim.SGD(params, lr={lr!r})


    class MarkedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, outputs, targets):
            open({marker!r}, "a").write("called\\n")
            return super().forward(outputs, targets)


    def loss_fn():
        return MarkedLoss(reduction="none")


    def train_dataset_fn():
        return _blobs(0, 12)


    def test_dataset_fn():
        return _blobs(1, 30)


    def TEST_TRANSFORM(x):
        return torch.zeros_like(x)
    """
)


def write_config(path: Path, method: str = "er", lr: float = 0.1, replay: bool = True, **options: object) -> Path:
    opts = {"memory_size": 7} if replay else {}
    opts.update({"batch_size": 4, "max_epochs": 2, "seed": 3, "accelerator": "cpu", **options})
    path.write_text(CONFIG.format(method=method, options=opts, lr=lr, marker=str(path.with_suffix(".marker"))))
    return path


def retain_cmd(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "retain.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.mark.slow
def test_update_twice_then_evaluate_in_fresh_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.py")
    first = retain_cmd("update", "--config", config, "--output-state", tmp_path / "v0")
    assert first.returncode == 0, first.stderr
    assert "state written to" in first.stdout
    manifest = json.loads((tmp_path / "v0" / "manifest.json").read_text())
    assert manifest["method"] == "ExperienceReplayModelUpdater"
    assert manifest["method_options"]["memory_size"] == 7
    assert {k: manifest["options"][k] for k in ("batch_size", "max_epochs", "seed")} == {
        "batch_size": 4, "max_epochs": 2, "seed": 3}  # fmt: skip
    assert manifest["task_ids_seen"] == ["t1"]
    learner = json.loads((tmp_path / "v0" / "learner.json").read_text())
    assert learner["global_step"] == 2 * 12 // 2  # 2 epochs of 12 items, 2 new items per step (batch 4 split 0.5)
    assert json.loads((tmp_path / "v0" / "memory.json").read_text())["memory_size"] == 7
    assert config.with_suffix(".marker").read_text().count("called") >= learner["global_step"]

    second = retain_cmd("update", "--config", config, "--input-state", tmp_path / "v0", "--output-state",
                        tmp_path / "v1")  # fmt: skip
    assert second.returncode == 0, second.stderr
    learner = json.loads((tmp_path / "v1" / "learner.json").read_text())
    assert (learner["updates_done"], learner["global_step"]) == (2, 24)

    out = tmp_path / "score.json"
    evaluated = retain_cmd("evaluate", "--config", config, "--state", tmp_path / "v1", "--output", out)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(out.read_text())
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == result
    # the hand-computed score: the saved model on the test data through TEST_TRANSFORM (all zeros)
    model = retain.load_model(tmp_path / "v1")
    g = torch.Generator().manual_seed(1)
    y = torch.arange(30) % 3
    x = torch.randn(30, 4, generator=g) + 3.0 * y[:, None].float()
    with torch.no_grad():
        with_transform = float((model(torch.zeros_like(x), "t1").argmax(1) == y).float().mean())
        without = float((model(x, "t1").argmax(1) == y).float().mean())
    assert with_transform != without, "the test cannot tell whether the transform is applied"
    assert result == {"state": str(tmp_path / "v1"), "accuracy": pytest.approx(with_transform), "items": 30}


@pytest.mark.slow
def test_the_config_optimizer_and_method_override_are_used(tmp_path: Path) -> None:
    """lr=0 in the config's optimizer_fn: fine-tuning (--method overrides METHOD) leaves model_fn's weights."""
    config = write_config(tmp_path / "cfg.py", method="er", lr=0.0, replay=False)
    done = retain_cmd("update", "--config", config, "--output-state", tmp_path / "v0", "--method", "finetune")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "v0" / "manifest.json").read_text())
    assert manifest["method"] == "FineTuningModelUpdater"
    torch.manual_seed(0)
    fresh = retain.MultiLayerPerceptron(num_inputs=4, num_outputs=3, hidden_sizes=[8])
    saved = retain.load_model(tmp_path / "v0").state_dict()
    kept = fresh.state_dict()  # everything but the head of task t1, which the update adds (drawn then)
    assert set(kept) < set(saved) and all(k.startswith("heads.t1.") for k in set(saved) - set(kept))
    assert all(torch.equal(saved[k], v) for k, v in kept.items())


def test_a_user_error_exits_2_with_one_line(tmp_path: Path) -> None:
    done = retain_cmd("update", "--config", tmp_path / "missing.py", "--output-state", tmp_path / "v0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"retain update: error: config file {tmp_path / 'missing.py'} "
                                                "does not exist"]  # fmt: skip
    assert not (tmp_path / "v0").exists()


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_config_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "cfg.py")
    out = ["--output-state", str(tmp_path / "v0")]
    bad_method = write_config(tmp_path / "bad_method.py", method="erx")
    assert "unknown method 'erx'" in error_of(["update", "--config", str(bad_method), *out], capsys)
    no_train = tmp_path / "no_train.py"
    no_train.write_text(config.read_text().replace("def train_dataset_fn", "def other_fn"))
    assert "defines no train_dataset_fn()" in error_of(["update", "--config", str(no_train), *out], capsys)
    typo = write_config(tmp_path / "typo.py", memory_sise=3)
    assert "unknown option(s) memory_sise" in error_of(["update", "--config", str(typo), *out], capsys)
    assert not (tmp_path / "v0").exists()
    message = error_of(["evaluate", "--config", str(config), "--state", str(tmp_path / "nowhere")], capsys)
    assert f"state folder {tmp_path / 'nowhere'} does not exist" in message
