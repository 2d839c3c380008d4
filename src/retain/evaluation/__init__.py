"""Evaluation: accuracy of a model on tasks, continual-learning metrics, and run reports.

* :mod:`~retain.evaluation.metrics` -- ACC, BWT, FWT (GEM) and forgetting on an accuracy matrix.
* :mod:`~retain.evaluation.evaluate` -- accuracy of a model on tensors / on every task's test split.
* :mod:`~retain.evaluation.report` -- ``results.json`` schema, CSV/PNG report, terminal table.
"""

from retain.evaluation.evaluate import EvalTask, accuracy, accuracy_on_dataset, accuracy_row
from retain.evaluation.metrics import (
    ARRAY_KEYS,
    METRIC_KEYS,
    aggregate_runs,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    summarize,
)
from retain.evaluation.report import (
    build_multi_seed_result,
    build_result,
    format_comparison,
    format_table,
    is_multi_seed,
    seen_task_average,
    write_comparison,
    write_report,
)

__all__ = [
    "ARRAY_KEYS",
    "METRIC_KEYS",
    "EvalTask",
    "accuracy",
    "accuracy_on_dataset",
    "accuracy_row",
    "aggregate_runs",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "build_multi_seed_result",
    "build_result",
    "format_comparison",
    "format_table",
    "forward_transfer",
    "is_multi_seed",
    "seen_task_average",
    "summarize",
    "write_comparison",
    "write_report",
]
