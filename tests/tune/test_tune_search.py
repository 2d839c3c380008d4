"""A real ``retain tune`` search on digits: 4 Syne Tune trials, each a whole continual sequence
scored on validation data, one of which fails."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from retain.cli import main
from retain.tune import check_search_space, random_configurations, syne_tune_space

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("syne_tune") is None,
    reason="syne-tune is not installed (pip install -e '.[tune]'): the search test cannot run",
)
SPACE = {
    "learning_rate": {"type": "loguniform", "lower": 0.01, "upper": 0.2},
    "alpha": {"type": "uniform", "lower": 0.2, "upper": 1.0},
    # 1.5 is refused by the learner (batch_memory_frac must lie in [0, 1)): those trials fail
    "batch_memory_frac": {"type": "choice", "values": [0.25, 0.5, 1.5]},
    "max_epochs": 1,
}
# A short sequence: 2 tasks of 5 digits, a small MLP.
SMALL = ["--dataset", "digits", "--num-tasks", "2", "--hidden-sizes", "32", "--memory-size", "50", "--batch-size", "20"]


@pytest.mark.slow
def test_retain_tune_runs_four_trials_and_writes_the_table_and_best_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "tune"
    code = main(["tune", "--method", "er", *SMALL, "--search-space", str(space), "--trials", "4",
                 "--workers", "2", "--seed", "0", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [r["trial_id"] for r in rows] == ["0", "1", "2", "3"]
    for r in rows:
        assert 0.01 <= float(r["learning_rate"]) <= 0.2 and 0.2 <= float(r["alpha"]) <= 1.0
        if r["batch_memory_frac"] == "1.5":  # a failed trial is marked failed, the search goes on
            assert r["status"] == "Failed" and r["val_accuracy"] == ""
        else:
            assert r["batch_memory_frac"] in ("0.25", "0.5") and r["status"] == "Completed"
            assert 0.0 <= float(r["val_accuracy"]) <= 1.0 and float(r["seconds"]) > 0.0
    # the trials are the seeded draws of the search space, in order (a reproducible search)
    expected = random_configurations(syne_tune_space(check_search_space(SPACE, "er")), 4, seed=0)
    for r, e in zip(rows, expected, strict=True):
        assert float(r["learning_rate"]) == pytest.approx(e["learning_rate"])
        assert float(r["batch_memory_frac"]) == e["batch_memory_frac"]
    failed = [r["trial_id"] for r in rows if r["status"] == "Failed"]
    assert failed == [str(i) for i, e in enumerate(expected) if e["batch_memory_frac"] == 1.5] == ["1"]
    completed = [r for r in rows if r["status"] == "Completed"]
    best = json.loads((out / "best_config.json").read_text())
    assert best["val_accuracy"] == max(float(r["val_accuracy"]) for r in completed)
    assert set(best["hyperparameters"]) == {"learning_rate", "alpha", "batch_memory_frac"}
    assert best["config"]["training_options"]["max_epochs"] == 1  # the fixed value of the space
    assert best["command"].startswith("retain benchmark --method er --dataset digits")
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and "val accuracy (%)" in table[0]
    assert "failed trials [1]" in printed
