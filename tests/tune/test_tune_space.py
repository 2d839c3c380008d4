"""retain tune without running a search: search-space files, where each option goes, the
benchmark's validation-only scoring, the command line of the best configuration, and the
message when syne-tune is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import retain.benchmark as benchmark
from retain.benchmark import BenchmarkConfig, run_benchmark
from retain.cli import main
from retain.tune import base_description, benchmark_command, check_search_space, load_search_space, trial_config

REPO = Path(__file__).resolve().parents[2]


def test_the_digits_search_space_file_is_valid_for_derpp() -> None:
    space = load_search_space(REPO / "benchmarks" / "search_space_digits.json", "derpp")
    assert set(space) == {"learning_rate", "alpha", "beta", "batch_memory_frac", "ema_memory_update_gamma"}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "non-empty"),
        ({"alpha": {"type": "normal", "lower": 0, "upper": 1}}, "type 'normal'"),
        ({"alpha": {"type": "uniform", "lower": 1, "upper": 0}}, "lower < upper"),
        ({"alpha": {"type": "uniform", "lower": 0}}, "exactly the keys"),
        ({"learning_rate": {"type": "loguniform", "lower": 0, "upper": 1}}, "lower > 0"),
        ({"memory_size": {"type": "randint", "lower": 10.5, "upper": 20}}, "integer bounds"),
        ({"batch_size": {"type": "choice", "values": []}}, "non-empty list"),
        ({"beta": {"type": "uniform", "lower": 0, "upper": 1}}, "'beta' is not an option of --method er"),
        ({"max_epochs": 1}, "nothing to search"),
    ],
)
def test_bad_search_spaces_are_refused_with_the_reason(space: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_search_space(space, "er")


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_search_space(tmp_path / "nope.json", "er")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_search_space(tmp_path / "bad.json", "er")


def test_trial_values_go_to_config_method_and_training_options() -> None:
    space = check_search_space({"learning-rate": {"type": "loguniform", "lower": 0.01, "upper": 0.1},
                                "beta": {"type": "uniform", "lower": 0, "upper": 1}, "max_epochs": 2}, "derpp")
    assert list(space) == ["learning_rate", "beta", "max_epochs"]  # dashes accepted
    base = base_description(BenchmarkConfig(method="derpp", val_fraction=0.2, method_options={"memory_size": 50},
                                            training_options={"batch_size": 10}))
    config = trial_config(json.loads(json.dumps(base)), {"learning_rate": 0.02, "beta": 0.3, "max_epochs": 2})
    assert config.learning_rate == 0.02
    assert config.method_options == {"memory_size": 50, "beta": 0.3}
    assert config.training_options == {"batch_size": 10, "progress_bar": False, "max_epochs": 2}
    assert config.score_on == "val" and config.hidden_sizes == (100, 100) and config.seeds == (0,)


def test_benchmark_command_reproduces_the_config() -> None:
    config = BenchmarkConfig(method="derpp", num_tasks=2, learning_rate=0.03, method_options={"alpha": 0.25},
                             training_options={"max_epochs": 3, "mask_unused_classes": True, "progress_bar": False})
    command = benchmark_command(config)
    assert command.startswith("retain benchmark --method derpp --dataset digits")
    for part in ("--num-tasks 2", "--learning-rate 0.03", "--alpha 0.25", "--max-epochs 3", "--mask-unused-classes"):
        assert part in command
    assert "--val-fraction" not in command and "progress" not in command


def test_score_on_val_reads_no_test_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every accuracy of a validation-scored benchmark is computed on the tasks' val parts."""
    scored: list[Any] = []
    rows: list[list[float]] = []
    real_row = benchmark.accuracy_row

    def recording_row(model: Any, tasks: Any, **kw: Any) -> list[float]:
        scored.extend(task.test for task in tasks)
        rows.append(list(real_row(model, tasks, **kw)))
        return rows[-1]

    real_scenario = benchmark.make_scenario
    made: list[Any] = []

    def recording_scenario(*a: Any, **kw: Any) -> Any:
        made.extend(real_scenario(*a, **kw))
        return made

    monkeypatch.setattr(benchmark, "accuracy_row", recording_row)
    monkeypatch.setattr(benchmark, "make_scenario", recording_scenario)
    config = BenchmarkConfig(method="er", num_tasks=2, val_fraction=0.2, score_on="val", hidden_sizes=(16,),
                             output=str(tmp_path), method_options={"memory_size": 20},
                             training_options={"max_epochs": 1, "batch_size": 20})
    result = run_benchmark(config, log=lambda *a: None)
    assert len(scored) == 2 * 3  # the initial row and one row after each of the 2 updates
    assert all(any(s is t.val for t in made) for s in scored)
    assert not any(any(s is t.test for t in made) for s in scored)
    # the score is the mean of the last row of the val accuracies recorded above (GEM's ACC)
    assert result["average_accuracy"] == pytest.approx(sum(rows[-1]) / len(rows[-1]))
    with pytest.raises(ValueError, match="val_fraction > 0"):
        run_benchmark(BenchmarkConfig(score_on="val", output=str(tmp_path)), log=lambda *a: None)


def test_without_syne_tune_the_command_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "syne_tune", None)  # import syne_tune now raises ImportError
    code = main(["tune", "--method", "er", "--search-space", str(tmp_path / "s.json"), "--trials", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pip install -e '.[tune]'" in err
