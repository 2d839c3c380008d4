"""Run a method over a whole scenario, the way a deployment would, and report continual metrics.

Each update is a new updater built from the previous update's state folder (under
``OUTPUT/state``), so a benchmark exercises the same path as a scheduled retraining job. After
each update the served model is scored on the test part of every task, giving the accuracy
matrix R[i][j] and the metrics of ``retain.evaluation``.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from retain.benchmark_recipes import RECIPES, TRAINING_RECIPE_KEYS
from retain.data import default_transforms, load_dataset, make_scenario
from retain.data.transforms import ToFloat
from retain.evaluation import (
    accuracy_row,
    build_multi_seed_result,
    build_result,
    format_comparison,
    format_table,
    write_comparison,
    write_report,
)
from retain.learners.base import ReplayLearner
from retain.methods import (
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayModelUpdater,
    FineTuningModelUpdater,
    JointModelUpdater,
    PooledOutputDistillationExperienceReplayModelUpdater,
    RepeatedDistillationModelUpdater,
    SuperExperienceReplayModelUpdater,
)
from retain.models import ContinualModel, MultiLayerPerceptron, ResNet18
from retain.options import TRAINING_OPTION_NAMES, TrainingOptions, check_choice, option_docs
from retain.state import OutputLock, remove_state_folder
from retain.updaters.base import ModelUpdater


@dataclass(frozen=True)
class MethodSpec:
    """A method as the command line knows it: its updater and the defaults the CLI shows."""

    updater: type[ModelUpdater]
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    class_incremental_note: str = ""  # printed when the method runs on a class-incremental scenario

    def method_options(self) -> dict[str, Any]:
        """The method's own options and the defaults the CLI runs them with (the updater's
        signature, then this method's ``defaults``); training options are not among them."""
        options: dict[str, Any] = {}
        for name, p in inspect.signature(self.updater).parameters.items():
            if name in _NOT_OPTIONS or name in TRAINING_OPTION_NAMES or p.default is inspect.Parameter.empty:
                continue
            options[name] = p.default
        options.update(self.defaults)
        return options

    def option_docs(self) -> dict[str, str]:
        """What each option of the method does (from the docstrings that define them)."""
        return option_docs(*(c for c in (getattr(self.updater, "learner_class", None),) if c is not None),
                           ReplayLearner, TrainingOptions)


_NOT_OPTIONS = {"self", "model", "loss_fn", "optimizer", "components", "input_state_folder", "output_state_folder"}

METHODS: dict[str, MethodSpec] = {
    "finetune": MethodSpec(FineTuningModelUpdater, "fine-tuning on each chunk alone (lower bound)"),
    "joint": MethodSpec(JointModelUpdater, "retrain from scratch on all data seen (upper bound)"),
    "er": MethodSpec(ExperienceReplayModelUpdater, "Experience Replay (Chaudhry et al. 2019)", {"memory_size": 500}),
    "der": MethodSpec(DarkExperienceReplayModelUpdater, "Dark Experience Replay (beta=0)",
                      {"memory_size": 500, "beta": 0.0}),
    "derpp": MethodSpec(DarkExperienceReplayModelUpdater, "DER++ (Buzzega et al. 2020)", {"memory_size": 500}),
    "pod": MethodSpec(PooledOutputDistillationExperienceReplayModelUpdater, "Pooled Output Distillation ER",
                      {"memory_size": 500},
                      "POD-ER distils the memory's intermediate features but trains on no replayed label: in a "
                      "class-incremental scenario its classifier forgets the old classes (about fine-tuning's "
                      "accuracy, with any alpha: 19-21 % on digits for alpha 1, 10 and 100). Use super (POD + "
                      "DER++ + CLS-ER) or derpp there; POD-ER suits task-incremental or domain-incremental runs."),
    "cls": MethodSpec(CLSExperienceReplayModelUpdater, "CLS-ER (Arani et al. 2022)", {"memory_size": 500}),
    "super": MethodSpec(SuperExperienceReplayModelUpdater, "DER++ + shrink&perturb + CLS-ER + POD",
                        {"memory_size": 500}),
    "rd": MethodSpec(RepeatedDistillationModelUpdater, "Repeated Distillation (expert + consolidation on memory)",
                     {"memory_size": 500, "consolidation_epochs": 50}),
}

def run_defaults(method: str, dataset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method options, training options) that ``retain benchmark`` runs ``method`` with on
    ``dataset`` when the user gives none: the method's defaults, the dataset recipe's memory size,
    batch size and epochs. What ``--help`` shows is this."""
    options = METHODS[method].method_options()
    recipe = RECIPES.get(dataset, {})
    if "memory_size" in options and "memory_size" in recipe:
        options["memory_size"] = recipe["memory_size"]
    options.update(recipe.get("methods", {}).get(method, {}))
    training = {k: recipe[k] for k in TRAINING_RECIPE_KEYS if k in recipe}
    return options, training


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
MODELS = ("mlp", "resnet18")


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run; ``method_options`` and ``training_options`` are
    passed to the updater as keyword arguments."""

    method: str = "er"
    dataset: str = "digits"
    scenario: str = "class-incremental"
    num_tasks: int | None = None
    classes_per_task: int | None = None
    shuffle_classes: bool = False
    val_fraction: float = 0.0
    score_on: str = "test"  # 'val': the accuracy matrix is measured on the val parts only (for tuning)
    data_dir: str | None = None
    model: str = "mlp"
    hidden_sizes: tuple[int, ...] = (100, 100)
    width: int = 20
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment: bool = False
    seeds: tuple[int, ...] = (0,)
    output: str = "runs/benchmark"
    keep_all_states: bool = False
    threads: int | None = None  # CPU threads; None: 1 for the MLP (tiny matmuls lose to threading), else torch's
    method_options: dict[str, Any] = field(default_factory=dict)
    training_options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hidden_sizes"] = list(self.hidden_sizes)
        d["seeds"] = list(self.seeds)
        return d


def benchmark_model(config: BenchmarkConfig, input_shape: tuple[int, ...], num_classes: int) -> ContinualModel:
    """The model of a benchmark run: the MLP or ResNet-18 that `config` names, sized for the data."""
    if config.model == "mlp":
        num_inputs = 1
        for d in input_shape:
            num_inputs *= int(d)
        return MultiLayerPerceptron(num_inputs, num_classes, list(config.hidden_sizes))
    return ResNet18(num_classes, config.width, in_channels=int(input_shape[0]))


def run_benchmark(config: BenchmarkConfig, log: Any = print) -> dict[str, Any]:
    """Runs ``config`` for every seed, writes the report under ``config.output``, returns the result."""
    check_choice("method", config.method, METHODS)
    check_choice("model", config.model, MODELS)
    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    spec = METHODS[config.method]
    method_options = {**spec.defaults, **config.method_options}
    if spec.class_incremental_note and config.scenario == "class-incremental":
        log(f"note: {spec.class_incremental_note}")
    known = spec.method_options()
    unknown = sorted(set(method_options) - set(known))
    if unknown:
        raise ValueError(f"method {config.method!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(sorted(known))}")
    TrainingOptions.from_kwargs("retain benchmark", **config.training_options)  # fail before loading data
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif config.model == "mlp":
        torch.set_num_threads(1)
    check_choice("score_on", config.score_on, ("test", "val"))
    if config.score_on == "val" and not config.val_fraction > 0:
        raise ValueError("score_on='val' needs val_fraction > 0 (the share of each task's train data held out)")

    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; name a folder for the report and the state folders")
    output.mkdir(parents=True, exist_ok=True)
    with OutputLock(output / "state"):  # a second run into the same --output fails at once
        return _run_benchmark(config, spec, method_options, output, log)


def _run_benchmark(config: BenchmarkConfig, spec: MethodSpec, method_options: dict[str, Any], output: Path,
                   log: Any) -> dict[str, Any]:
    splits = load_dataset(config.dataset, config.data_dir)
    scenario_kwargs: dict[str, Any] = {"val_fraction": config.val_fraction}
    if config.scenario in ("class-incremental", "task-incremental"):
        scenario_kwargs.update(num_tasks=config.num_tasks, classes_per_task=config.classes_per_task,
                               shuffle_classes=config.shuffle_classes)
    else:
        scenario_kwargs["num_tasks"] = config.num_tasks or 20
    per_seed = {"class_order_seed"} if config.shuffle_classes else set()
    runs = []
    for seed in config.seeds:
        tasks = make_scenario(config.scenario, splits, seed=seed, **scenario_kwargs,
                              **dict.fromkeys(per_seed, seed))
        if config.dataset.startswith("cifar"):
            train_transform, test_transform = default_transforms(splits, augment=config.augment)
        else:  # the DER protocol: inputs scaled to [0, 1], no normalisation
            train_transform = test_transform = ToFloat(splits.scale)
        runs.append(_run_one_seed(config, spec, method_options, splits, tasks, seed, train_transform,
                                  test_transform, output / "state" / f"seed{seed}", log))
    result = runs[0] if len(runs) == 1 else build_multi_seed_result(runs, seeds=list(config.seeds),
                                                                     config=config.describe())
    result["task_classes"] = runs[0]["task_classes"]
    result["versions"] = versions()
    write_report(output, result)
    log(format_table(result))
    log(f"report written to {output}/ (results.json, accuracy_matrix.csv, metrics.csv, PNG plots)")
    return result


def _run_one_seed(config: BenchmarkConfig, spec: MethodSpec, method_options: dict[str, Any], splits: Any,
                  tasks: list[Any], seed: int, train_transform: Any, test_transform: Any, state_root: Path,
                  log: Any) -> dict[str, Any]:
    task_incremental = config.scenario == "task-incremental"
    optimizer = functools.partial(OPTIMIZERS[config.optimizer], lr=config.learning_rate,
                                  weight_decay=config.weight_decay,
                                  **({"momentum": config.momentum} if config.optimizer == "sgd" else {}))
    training_options = {"seed": seed, "progress_bar": True, **config.training_options}
    training_options.setdefault("train_transform", train_transform)
    training_options.setdefault("test_transform", test_transform)
    for stale in sorted(state_root.glob("update*")) if state_root.is_dir() else []:
        remove_state_folder(stale)  # a previous run's states; anything else there is refused, not deleted
    torch.manual_seed(seed)
    initial_model = benchmark_model(config, splits.input_shape, splits.num_classes)
    device_model = None
    # With score_on='val' every accuracy below is measured on the tasks' val parts: no test data is read.
    scored = tasks if config.score_on == "test" else [replace(task, test=task.val) for task in tasks]
    initial_accuracy = accuracy_row(initial_model, scored, transform=test_transform, task_incremental=task_incremental)
    rows, seconds = [], []
    previous: Path | None = None
    for i, task in enumerate(tasks):
        torch.manual_seed(seed)
        model = benchmark_model(config, splits.input_shape, splits.num_classes)
        state = state_root / f"update{i}"
        updater = spec.updater(model, optimizer=optimizer, input_state_folder=previous, output_state_folder=state,
                               **method_options, **training_options)
        started = time.perf_counter()
        device_model = updater.update(task.train, task.val, task_id=task.task_id if task_incremental else None)
        seconds.append(time.perf_counter() - started)
        rows.append(accuracy_row(device_model, scored, transform=test_transform, task_incremental=task_incremental))
        seen = rows[-1][: i + 1]
        log(f"[seed {seed}] update {i + 1}/{len(tasks)} ({task.task_id}, {len(task.train)} items): "
            f"{seconds[-1]:.1f}s, mean accuracy on seen tasks {100 * sum(seen) / len(seen):.2f}%")
        if previous is not None and not config.keep_all_states:
            remove_state_folder(previous)
        previous = state
    return build_result(rows, config=config.describe(), train_seconds=seconds, initial_accuracy=initial_accuracy,
                        task_ids=[t.task_id for t in tasks], seed=seed,
                        task_classes=[[int(c) for c in t.classes] for t in tasks])


def versions() -> dict[str, str]:
    """The versions a result depends on: retain, torch, numpy and Python."""
    import platform

    import numpy

    from retain.version import __version__

    return {"retain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def run_comparison(configs: list[BenchmarkConfig], output: str | Path, log: Any = print) -> dict[str, Any]:
    """Runs each config (one per method, same scenario and seeds) into its own folder, then writes
    ``comparison.csv`` and ``comparison.png`` (average accuracy on the seen tasks after each update,
    one line per method, seeds' spread shaded) to ``output`` and prints the table."""
    if len({(c.dataset, c.scenario, c.seeds, c.num_tasks, c.classes_per_task) for c in configs}) != 1:
        raise ValueError("a comparison runs every method on the same dataset, scenario, tasks and seeds")
    results = {config.method: run_benchmark(config, log) for config in configs}
    paths = write_comparison(output, results)
    log(format_comparison(results))
    log(f"comparison written to {paths['comparison_png']} and {paths['comparison_csv']}")
    return results


__all__ = ["METHODS", "BenchmarkConfig", "MethodSpec", "run_benchmark", "run_comparison", "run_defaults", "versions"]
