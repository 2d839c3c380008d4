"""The comparison of several methods, the task-accuracy plot's y-axis, the forward-transfer note
of class-incremental runs, and scoring tasks whose head is not trained yet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from retain.data.scenarios import Task
from retain.evaluation import accuracy_row, build_multi_seed_result, build_result, format_table, write_comparison
from retain.evaluation.report import _accuracy_limits, _plot_task_curves, _View, seen_task_average
from retain.models import MultiLayerPerceptron


def _run(final: float, seed: int, scenario: str = "class-incremental") -> dict:
    R = [[1.0, np.nan], [final, 0.9]]
    return build_result(R, config={"method": "m", "scenario": scenario}, train_seconds=[1.0, 1.0],
                        initial_accuracy=[0.1, 0.12], seed=seed)


def test_seen_task_average_is_the_mean_over_seen_tasks_with_the_seeds_spread() -> None:
    multi = build_multi_seed_result([_run(0.5, 0), _run(0.7, 1)], seeds=[0, 1])
    mean, std = seen_task_average(multi)
    assert np.allclose(mean, [1.0, (0.6 + 0.9) / 2]) and np.allclose(std, [0.0, np.std([0.7, 0.8], ddof=1)])


def test_write_comparison_writes_one_row_per_method_and_update(tmp_path: Path) -> None:
    results = {"a": build_multi_seed_result([_run(0.5, 0), _run(0.7, 1)], seeds=[0, 1]), "b": _run(0.2, 0)}
    paths = write_comparison(tmp_path, results)
    rows = list(csv.DictReader(paths["comparison_csv"].open()))
    assert [(r["method"], r["after_update"]) for r in rows] == [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")]
    assert float(rows[-1]["final_average_accuracy"]) == 0.55
    assert paths["comparison_png"].stat().st_size > 5_000


def test_accuracy_axis_follows_the_data_instead_of_0_to_100() -> None:
    assert _accuracy_limits(np.array([93.0, 99.0, 100.0])) == (79.0, 101.0)
    assert _accuracy_limits(np.array([3.0, 100.0])) == (-1.0, 101.0)
    fig = _plot_task_curves(_View(build_result([[0.99, np.nan], [0.95, 0.97]], config={}, train_seconds=[1, 1])))
    low, high = fig.axes[0].get_ylim()
    assert 80 <= low <= 90 and high == 101.0


def test_class_incremental_table_explains_negative_forward_transfer() -> None:
    assert "negative by construction in class-incremental runs" in format_table(_run(0.5, 0))
    assert "negative by construction" not in format_table(_run(0.5, 0, scenario="permuted"))


def test_task_incremental_row_scores_untrained_tasks_with_a_fresh_head() -> None:
    torch.manual_seed(0)
    model = MultiLayerPerceptron(4, 4, [4])
    model.add_task_params("task0")
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    tasks = [Task(t, c, None, None, torch.utils.data.TensorDataset(x, y + c[0]))  # type: ignore[arg-type]
             for t, c in (("task0", [0, 1]), ("task1", [2, 3]))]
    state = torch.random.get_rng_state()
    row = accuracy_row(model, tasks, task_incremental=True)
    assert len(row) == 2 and "task1" not in model.heads  # scored on a copy
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched
