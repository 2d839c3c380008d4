"""Datasets, batched transforms and continual-learning scenarios."""

from retain.data.datasets import (
    DATASET_NAMES,
    DatasetFileError,
    FileSpec,
    TensorSplits,
    load_dataset,
    resolve_data_dir,
)
from retain.data.scenarios import (
    SCENARIO_NAMES,
    Task,
    class_incremental,
    make_scenario,
    permuted,
    rotated,
    task_incremental,
    task_incremental_logits,
)
from retain.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToFloat,
    default_transforms,
)

__all__ = [
    "DATASET_NAMES",
    "SCENARIO_NAMES",
    "Compose",
    "DatasetFileError",
    "FileSpec",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Task",
    "TensorSplits",
    "ToFloat",
    "class_incremental",
    "default_transforms",
    "load_dataset",
    "make_scenario",
    "permuted",
    "resolve_data_dir",
    "rotated",
    "task_incremental",
    "task_incremental_logits",
]
