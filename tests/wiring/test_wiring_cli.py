"""`retain update` and `retain evaluate` end to end from a config file, in fresh processes.

The config's options, optimizer, loss, task id and METHOD must reach the update (read back from
the state folder it writes); `retain evaluate` must score the saved model on the config's test
data through the config's ``TEST_TRANSFORM``; user errors end with exit status 2 and one line
naming the problem.

The in-process tests call ``retain.cli.main`` with a fake updater (what the config hands it,
the defaults, every one-line error, the process-group exits), stubbed benchmark/tune/evaluation
entry points, and one real in-process update for ``retain evaluate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ in-process: what the config hands the updater
class FakeUpdater:
    """Stands for the method's updater: records what ``retain update`` builds and calls it with."""

    made: list[dict[str, Any]] = []
    updates: list[tuple[Any, ...]] = []
    fail_with: BaseException | None = None

    def __init__(self, model: Any, loss_fn: Any, optimizer: Any, **kwargs: Any) -> None:
        FakeUpdater.made.append({"model": model, "loss_fn": loss_fn, "optimizer": optimizer, **kwargs})

    def update(self, train: Any, val: Any, train_dataset_collate_fn: Any = None, val_dataset_collate_fn: Any = None,
               task_id: Any = None) -> None:  # fmt: skip
        FakeUpdater.updates.append((train, val, train_dataset_collate_fn, val_dataset_collate_fn, task_id))
        if FakeUpdater.fail_with is not None:
            raise FakeUpdater.fail_with


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeUpdater]:
    import dataclasses

    from retain.benchmark import METHODS

    monkeypatch.setitem(METHODS, "er", dataclasses.replace(METHODS["er"], updater=FakeUpdater))
    monkeypatch.setattr(FakeUpdater, "made", [])
    monkeypatch.setattr(FakeUpdater, "updates", [])
    monkeypatch.setattr(FakeUpdater, "fail_with", None)
    return FakeUpdater


MINIMAL = """\
def model_fn():
    return "MODEL"


def train_dataset_fn():
    return "TRAIN"
"""


def _cfg(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(body))
    return path


def _run_update(config: Path, *extra: str) -> int:
    return main(["update", "--config", str(config), "--output-state", "out", *extra])


def test_update_hands_every_config_function_to_the_updater(tmp_path: Path, fake: type[FakeUpdater],
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    config = _cfg(tmp_path, MINIMAL + textwrap.dedent("""
        METHOD = "er"
        UPDATER_OPTIONS = {"memory_size": 3}
        TASK_ID = "t9"


        def val_dataset_fn():
            return "VAL"


        def optimizer_fn(params):
            return None


        def loss_fn():
            return "LOSS"


        def collate(items):
            return items


        COLLATE_FN = collate
        """))  # fmt: skip
    assert _run_update(config, "--input-state", "in") == 0
    (made,) = fake.made
    assert made["optimizer"].__name__ == "optimizer_fn"
    assert {k: v for k, v in made.items() if k != "optimizer"} == {
        "model": "MODEL", "loss_fn": "LOSS", "input_state_folder": "in", "output_state_folder": "out",
        "memory_size": 3, "progress_bar": True}  # fmt: skip
    ((train, val, train_collate, val_collate, task_id),) = fake.updates
    assert (train, val, task_id) == ("TRAIN", "VAL", "t9")
    assert train_collate.__name__ == "collate" and val_collate is train_collate
    assert capsys.readouterr().out == "updated with er: state written to out\n"


def test_update_defaults_without_the_optional_functions(tmp_path: Path, fake: type[FakeUpdater]) -> None:
    """No optimizer_fn: SGD lr 0.01; no loss_fn, val_dataset_fn, COLLATE_FN, TASK_ID: None; the
    config's progress_bar is kept, and its UPDATER_OPTIONS dict is not changed (the val function,
    called after the updater is built, sees it)."""
    config = _cfg(tmp_path, MINIMAL + textwrap.dedent("""
        METHOD = "finetune"
        UPDATER_OPTIONS = {"progress_bar": False}


        def val_dataset_fn():
            return dict(UPDATER_OPTIONS)
        """))  # fmt: skip
    assert _run_update(config, "--method", "er") == 0
    (made,) = fake.made
    optimizer = made.pop("optimizer")
    assert optimizer.func is torch.optim.SGD and optimizer.args == () and optimizer.keywords == {"lr": 0.01}
    assert made == {"model": "MODEL", "loss_fn": None, "input_state_folder": None, "output_state_folder": "out",
                    "progress_bar": False}  # fmt: skip
    assert fake.updates == [("TRAIN", {"progress_bar": False}, None, None, None)]
    fake.made.clear()
    fake.updates.clear()
    no_options = _cfg(tmp_path, MINIMAL + "METHOD = 'er'\nUPDATER_OPTIONS = {}\ndef val_dataset_fn():\n"
                                          "    return dict(UPDATER_OPTIONS)\n")  # fmt: skip
    assert _run_update(no_options) == 0
    assert fake.made[0]["progress_bar"] is True and fake.updates[0][1] == {}
    fake.made.clear()
    assert _run_update(_cfg(tmp_path, MINIMAL + "METHOD = 'er'\n")) == 0
    assert fake.made[0]["progress_bar"] is True and fake.updates[-1][1] is None


def _one_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_update_refuses_a_bad_config_with_one_line(tmp_path: Path, fake: type[FakeUpdater],
                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    def error(body: str, *extra: str) -> str:
        config = _cfg(tmp_path, body)
        return _one_error(["update", "--config", str(config), "--output-state", "out", *extra], capsys)

    cfg = tmp_path / "cfg.py"
    er = "METHOD = 'er'\n"
    assert error(er + MINIMAL + "UPDATER_OPTIONS = [1]\n") == (
        f"retain update: error: {cfg}: UPDATER_OPTIONS must be a dict of updater keyword arguments, got list")
    assert error(er + "model_fn = 3\n") == f"retain update: error: config {cfg}: model_fn must be a function"
    assert error(er + MINIMAL + "COLLATE_FN = 3\n") == (
        f"retain update: error: config {cfg}: COLLATE_FN must be a function")
    assert error(er) == f"retain update: error: config {cfg} defines no model_fn(); it defines no *_fn function"
    assert error(er + "def z_fn(): pass\ndef loss_fn(): pass\nother = 1\n") == (
        f"retain update: error: config {cfg} defines no model_fn(); it defines loss_fn, z_fn")
    assert error(er + MINIMAL + "def val_dataset_fn():\n    return 3\nval_dataset_fn = 4\n") == (
        f"retain update: error: config {cfg}: val_dataset_fn must be a function")
    assert error("x = 1\nraise ValueError('boom')\n") == (
        f"retain update: error: {cfg}:2 in the module body: ValueError: boom")
    assert error(er + "def helper():\n    return {}['k']\ndef model_fn():\n    return helper()\n") == (
        f"retain update: error: {cfg}:3 in helper(): KeyError: 'k'")
    assert error(er + "import functools\nmodel_fn = functools.partial(int, 'x')\n") == (
        f"retain update: error: {cfg}, calling model_fn(): ValueError: invalid literal for int() with base 10: 'x'")
    message = error("x = 1\ndef model_fn(:\n    pass\n")
    assert message.startswith(f"retain update: error: {cfg}:2: SyntaxError: ")
    assert message.endswith(": def model_fn(:")
    message = error(MINIMAL + "METHOD = 'erx'\n")
    assert message.startswith("retain update: error: unknown method 'erx' (from --method or the config's METHOD); "
                              "choose one of: finetune, joint, er, ")  # fmt: skip
    assert error(MINIMAL).startswith("retain update: error: unknown method None")
    assert error(er + MINIMAL, "--method", "nope").startswith("retain update: error: unknown method 'nope'")
    assert len(fake.made) == 1, "only COLLATE_FN is checked after the updater is built"
    assert _one_error(["update", "--config", str(tmp_path / "none.py"), "--output-state", "out"], capsys) == (
        f"retain update: error: config file {tmp_path / 'none.py'} does not exist")


@pytest.mark.parametrize("error", [TypeError("bad option x"), ValueError("bad option x")])
def test_an_updater_refusing_its_options_is_one_line_naming_the_method(
    error: Exception, tmp_path: Path, fake: type[FakeUpdater], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(FakeUpdater, "__init__", refuse)
    config = _cfg(tmp_path, MINIMAL + "METHOD = 'er'\n")
    assert _one_error(["update", "--config", str(config), "--output-state", "out"], capsys) == (
        f"retain update: error: {config}: UPDATER_OPTIONS for METHOD 'er': bad option x")


def test_a_failed_update_leaves_the_process_group_and_reports_one_line(
    tmp_path: Path, fake: type[FakeUpdater], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A failing update destroys a live process group (no barrier) and is reported as one line; an
    OS error names its path; anything else propagates."""
    from retain.updaters import distributed

    destroyed: list[int] = []
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(1))
    config = _cfg(tmp_path, MINIMAL + "METHOD = 'er'\n")
    argv = ["update", "--config", str(config), "--output-state", "out"]
    fake.fail_with = ValueError("update failed")
    assert _one_error(argv, capsys) == "retain update: error: update failed"
    assert destroyed == [1]
    fake.fail_with = OSError(28, "No space left on device", "/x/y")
    assert _one_error(argv, capsys) == "retain update: error: /x/y: No space left on device"
    fake.fail_with = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert destroyed == [1, 1, 1]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    fake.fail_with = ValueError("again")
    assert _one_error(argv, capsys) == "retain update: error: again"
    assert destroyed == [1, 1, 1]


@pytest.mark.parametrize("launched", [False, True])
def test_a_launched_update_leaves_its_job_after_the_state_is_written(
    launched: bool, tmp_path: Path, fake: type[FakeUpdater], monkeypatch: pytest.MonkeyPatch
) -> None:
    from retain.updaters import distributed

    exits: list[int] = []
    monkeypatch.setattr(distributed, "shutdown_process_group", lambda: launched)
    monkeypatch.setattr(distributed, "exit_launched_job", exits.append)
    assert _run_update(_cfg(tmp_path, MINIMAL + "METHOD = 'er'\n")) == 0
    assert exits == ([0] if launched else [])


# ------------------------------------------------------------------ in-process: benchmark dispatch, main, parse_command
def test_benchmark_runs_one_method_alone_and_several_as_a_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retain.benchmark as benchmark

    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda config: calls.append(("one", config.method)))

    def comparison(configs: list[Any], output: str) -> None:
        calls.append(("many", ([c.method for c in configs], output)))

    monkeypatch.setattr(benchmark, "run_comparison", comparison)
    assert main(["benchmark", "--method", "derpp", "--output", str(tmp_path)]) == 0
    assert main(["--method", "er", "finetune", "--output", str(tmp_path)]) == 0
    assert calls == [("one", "derpp"), ("many", (["er", "finetune"], str(tmp_path)))]


def test_main_prints_help_and_version_and_refuses_unknown_commands(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from retain.cli import _DESCRIPTION
    from retain.version import __version__

    commands = "commands: benchmark, update, evaluate, tune   (`retain COMMAND --help` for details)\n"
    for argv in ([], ["-h"], ["--help"]):
        assert main(argv) == 0
        assert capsys.readouterr().out == _DESCRIPTION + "\n" + commands
    assert _DESCRIPTION.startswith("retain: continual learning")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"
    monkeypatch.setattr(sys, "argv", ["retain", "--version"])
    assert main() == 0
    assert capsys.readouterr().out == f"{__version__}\n"
    assert main(["bogus"]) == 2
    assert capsys.readouterr().err == (
        "retain: error: unknown command 'bogus'; choose one of: benchmark, update, evaluate, tune\n")


def test_parse_command_parses_every_command_without_running_it() -> None:
    from retain.cli import CLIError, parse_command

    assert parse_command([]).method == ["er"]
    assert parse_command(["--method", "derpp"]).method == ["derpp"]
    assert parse_command(["benchmark", "--method", "pod"]).method == ["pod"]
    update = parse_command(["update", "--config", "c.py", "--output-state", "o"])
    assert (update.config, update.output_state, update.input_state, update.method) == ("c.py", "o", None, None)
    evaluate = parse_command(["evaluate", "--state", "s", "--config", "c.py"])
    assert (evaluate.state, evaluate.config, evaluate.output) == ("s", "c.py", None)
    tune = parse_command(["tune", "--method", "er", "--search-space", "space.json"])
    assert (tune.method, tune.output) == (["er"], "runs/tune")
    with pytest.raises(CLIError, match=r"^unknown command 'bogus'; choose one of: benchmark, update, evaluate, tune$"):
        parse_command(["bogus"])
    with pytest.raises(SystemExit, match="2"):
        parse_command(["update", "--config", "c.py"])


# ------------------------------------------------------------------ in-process: evaluate
@pytest.fixture(scope="module")
def er_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, state) of one real in-process ER update (the test config of the end-to-end tests)."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "cfg.py")
    assert main(["update", "--config", str(config), "--output-state", str(root / "v0")]) == 0
    return config, root / "v0"


def test_evaluate_scores_with_the_configs_settings_and_writes_the_result(
    er_state: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import retain.evaluation as evaluation

    config, state = er_state
    calls: list[dict[str, Any]] = []

    def accuracy(model: Any, dataset: Any, **kwargs: Any) -> tuple[float, int]:
        calls.append({"model": model, "items": len(dataset), **kwargs})
        return 0.25, 30

    monkeypatch.setattr(evaluation, "accuracy_on_dataset", accuracy)
    custom = tmp_path / "cfg.py"
    custom.write_text(config.read_text() + "\nEVAL_BATCH_SIZE = '7'\ndef stack(items):\n    return items\n"
                                           "COLLATE_FN = stack\n")  # fmt: skip
    out = tmp_path / "result.json"
    capsys.readouterr()
    assert main(["evaluate", "--config", str(custom), "--state", str(state), "--output", str(out)]) == 0
    (call,) = calls
    assert isinstance(call["model"], retain.MultiLayerPerceptron) and not call["model"].training
    assert (call["items"], call["batch_size"], call["task_id"]) == (30, 7, "t1")
    assert call["transform"].__name__ == "TEST_TRANSFORM" and call["collate_fn"].__name__ == "stack"
    result = {"state": str(state), "accuracy": 0.25, "items": 30}
    assert capsys.readouterr().out == json.dumps(result) + "\n"
    assert out.read_text() == json.dumps(result, indent=2) + "\n"
    calls.clear()
    assert main(["evaluate", "--config", str(config), "--state", str(state)]) == 0
    assert calls[0]["batch_size"] == 256 and calls[0]["collate_fn"] is None
    assert json.loads(capsys.readouterr().out) == result


@pytest.mark.parametrize(("error", "line"), [
    (ValueError("the dataset is empty"), "retain evaluate: error: test_dataset_fn() returned an empty dataset"),
    (ValueError("labels out of range"), "retain evaluate: error: labels out of range"),
])  # fmt: skip
def test_evaluate_errors_are_one_line(
    error: Exception, line: str, er_state: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import retain.evaluation as evaluation

    def accuracy(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(evaluation, "accuracy_on_dataset", accuracy)
    config, state = er_state
    assert _one_error(["evaluate", "--config", str(config), "--state", str(state)], capsys) == line


def test_evaluate_builds_a_plain_modules_model_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plain nn.Module state records no constructor: evaluate loads it into the config's model_fn()."""
    config = _cfg(tmp_path, """\
        import torch
        from torch.utils.data import TensorDataset

        METHOD = "finetune"
        UPDATER_OPTIONS = {"batch_size": 4, "max_epochs": 1, "accelerator": "cpu"}


        def model_fn():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 3))


        def train_dataset_fn():
            g = torch.Generator().manual_seed(0)
            return TensorDataset(torch.randn(8, 4, generator=g), torch.arange(8) % 3)


        test_dataset_fn = train_dataset_fn
        """)  # fmt: skip
    assert main(["update", "--config", str(config), "--output-state", str(tmp_path / "v0")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--config", str(config), "--state", str(tmp_path / "v0")]) == 0
    result = json.loads(capsys.readouterr().out)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    retain.load_model(tmp_path / "v0", model=model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.arange(8) % 3
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert result == {"state": str(tmp_path / "v0"), "accuracy": pytest.approx(expected), "items": 8}


@pytest.mark.parametrize(("command", "description", "flags"), [
    ("update", "Run one update of your own model and data.", [
        ("--config CONFIG", "Python config file (see below)"),
        ("--input-state INPUT_STATE", "state folder of the previous update (omit for the first)"),
        ("--output-state OUTPUT_STATE", "where to write the new state folder"),
        ("--method METHOD", "overrides the config's METHOD")]),
    ("evaluate", "Accuracy of a saved state on your test data.", [
        ("--state STATE", "a state folder written by an update"),
        ("--config CONFIG", "Python config file providing test_dataset_fn()"),
        ("--output OUTPUT", "optional JSON file for the result")]),
])  # fmt: skip
def test_update_and_evaluate_help_shows_every_flag_and_the_config_convention(
    command: str, description: str, flags: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from retain.cli import CONFIG_CONVENTION

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit, match=r"^0$"):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: retain {command} [-h] ")
    assert f"\n\n{description}\n\n" in out
    assert out.endswith(CONFIG_CONVENTION), "the config convention is printed verbatim after the flags"
    assert CONFIG_CONVENTION.startswith("A config file is Python that defines:\n  model_fn()")
    for flag, help_text in flags:
        assert f"  {flag}" in out and f"{help_text}\n" in out, flag


@pytest.mark.parametrize(("argv", "missing"), [
    (["update", "--output-state", "o"], "--config"),
    (["update", "--config", "c.py"], "--output-state"),
    (["evaluate", "--config", "c.py"], "--state"),
    (["evaluate", "--state", "s"], "--config"),
    (["tune", "--method", "er"], "--search-space"),
])  # fmt: skip
def test_required_flags_are_required(argv: list[str], missing: str, capsys: pytest.CaptureFixture) -> None:
    from retain.cli import parse_command

    with pytest.raises(SystemExit, match=r"^2$"):
        parse_command(argv)
    err = capsys.readouterr().err
    assert err.startswith(f"usage: retain {argv[0]} ") and f"the following arguments are required: {missing}" in err


def test_tune_is_handed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import retain.tune as tune

    seen: list[list[str]] = []

    def tune_command(argv: list[str]) -> int:
        seen.append(list(argv))
        return 7

    monkeypatch.setattr(tune, "tune_command", tune_command)
    assert main(["tune", "--method", "er", "--trials", "2"]) == 7
    assert seen == [["--method", "er", "--trials", "2"]]


@pytest.mark.parametrize("failing", ["train_dataset_fn", "val_dataset_fn", "loss_fn", "test_dataset_fn"])
def test_an_error_in_each_config_function_names_it(failing: str, tmp_path: Path, fake: type[FakeUpdater],
                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    functions = ["model_fn", "train_dataset_fn", "val_dataset_fn", "loss_fn", "test_dataset_fn"]
    body = "METHOD = 'er'\n" + "".join(
        f"def {name}():\n    return {'1 / 0' if name == failing else repr(name)}\n" for name in functions
    )
    config = _cfg(tmp_path, body)
    line = 3 + 2 * functions.index(failing)
    if failing == "test_dataset_fn":
        argv = ["evaluate", "--config", str(config), "--state", "s"]
    else:
        argv = ["update", "--config", str(config), "--output-state", "out"]
    assert _one_error(argv, capsys) == (
        f"retain {argv[0]}: error: {config}:{line} in {failing}(): ZeroDivisionError: division by zero")
