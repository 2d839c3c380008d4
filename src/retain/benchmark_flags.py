"""The flags of ``retain benchmark`` (and ``retain tune``, which takes the same): one parser per
method built from the method's and the training options' own definitions, and the
``BenchmarkConfig`` they describe. Shared by the ``retain`` command and ``retain tune``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retain.benchmark_recipes import RECIPES

TRAINING_FLAGS = ("batch_size", "max_epochs", "learning_rate_scheduler_interval", "precision", "accelerator",
                  "devices", "strategy", "gradient_clip_val", "gradient_clip_algorithm", "mask_unused_classes",
                  "mask_class_set", "validation_data", "metric", "mode", "early_stopping_enabled", "patience",
                  "deterministic_trainer", "log_every_n_steps", "checkpoint_every_n_epochs")


class CLIError(Exception):
    """A user error, printed as one line without a traceback."""


def flag(name: str) -> str:
    """The command-line flag of option ``name`` (``--batch-size`` for ``batch_size``)."""
    return "--" + name.replace("_", "-")




def _type_of(default: Any, annotation: Any) -> type:
    if isinstance(default, bool):
        return bool
    if isinstance(default, int | float | str):
        return type(default)
    text = str(annotation)
    if "bool" in text:
        return bool
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def _add_option(group: argparse._ArgumentGroup, name: str, default: Any, annotation: Any, help_text: str,
                default_note: str = "") -> None:
    kind = _type_of(default, annotation)
    text = f"{help_text} (default: {_shown(default)}{default_note})".replace("%", "%%")
    if kind is bool:
        group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        group.add_argument(flag(name), dest=name, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def _benchmark_parser(
    methods: Sequence[str], dataset: str = "digits", prog: str = "retain benchmark", output: str = "runs/benchmark"
) -> argparse.ArgumentParser:
    """The benchmark flags; the defaults shown are those that run for ``methods`` on ``dataset``."""
    from retain.benchmark import METHODS, MODELS, OPTIMIZERS, run_defaults
    from retain.data import DATASET_NAMES, SCENARIO_NAMES
    from retain.options import TrainingOptions, option_docs

    recipe = RECIPES.get(dataset, {})
    note = f", the {dataset} recipe" if recipe else ""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a method over a continual scenario (each update from the previous state folder) and "
                    "write results.json, CSV tables and PNG plots to --output. Several --method values run on the "
                    "same scenario and seeds and add comparison.png and comparison.csv.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Method options: `retain benchmark --method NAME --help` lists every option of that method, with "
               "the defaults that run on --dataset.\n"
               "Methods: " + ", ".join(f"{k} ({v.summary})" for k, v in METHODS.items()),
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--method", nargs="+", default=["er"],
                   help=f"one or more of {', '.join(METHODS)} (default: er)")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASET_NAMES)} (default: digits, "
                   "built in, needs no files)")
    g.add_argument("--scenario", default="class-incremental",
                   help=f"one of {', '.join(SCENARIO_NAMES)} (default: class-incremental)")
    g.add_argument("--num-tasks", type=int, default=None,
                   help="number of updates (default: 5; 20 for permuted/rotated)")
    g.add_argument("--classes-per-task", type=int, default=None, help="classes per update, instead of --num-tasks")
    g.add_argument("--shuffle-classes", action="store_true", help="draw the class order from the seed")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of each task's train data held out as its validation data (default: 0)")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $RETAIN_DATA_DIR or ~/.cache/retain/data)")
    g.add_argument("--seed", dest="seeds", type=int, nargs="+", default=[0],
                   help="one or more seeds; several give mean ± std (default: 0)")
    g.add_argument("--output", default=output, help=f"report and state folders (default: {output})")
    g.add_argument("--keep-all-states", action="store_true", help="keep every update's state folder")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the MLP, whose tiny matrix products lose to threading)")
    m = p.add_argument_group("model and optimizer")
    m.add_argument("--model", default=None,
                   help=f"one of {', '.join(MODELS)} (default: {recipe.get('model', 'mlp')}{note})")
    m.add_argument("--hidden-sizes", type=int, nargs="+", default=[100, 100],
                   help="hidden layer widths of the MLP (default: 100 100)")
    m.add_argument("--width", type=int, default=20, help="ResNet-18 base width: 64 standard, 20 reduced (default: 20)")
    m.add_argument("--optimizer", default="sgd", help=f"one of {', '.join(OPTIMIZERS)} (default: sgd)")
    m.add_argument("--learning-rate", type=float, default=None,
                   help=f"learning rate (default: {recipe.get('learning_rate', 0.05)}{note})")
    m.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0)")
    m.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay of the optimizer (default: 0)")
    m.add_argument("--augment", action="store_true", help="random crop + horizontal flip of training images (CIFAR)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    docs = option_docs(TrainingOptions)
    t = p.add_argument_group("training options (every updater)")
    fields = {f.name: f for f in dataclasses.fields(TrainingOptions)}
    for name in TRAINING_FLAGS:
        default = recipe.get(name, fields[name].default)
        _add_option(t, name, default, fields[name].type, docs.get(name, name), note if name in recipe else "")
    known = [mth for mth in methods if mth in METHODS]
    if known:
        title = f"options of --method {' '.join(known)}" + (" (each applies to the methods that have it)"
                                                           if len(known) > 1 else "")
        o = p.add_argument_group(title)
        added: set[str] = set()
        annotations: dict[str, Any] = {}
        for mth in known:
            for n, par in inspect.signature(METHODS[mth].updater).parameters.items():
                annotations.setdefault(n, par.annotation)
        for mth in known:
            method_docs = METHODS[mth].option_docs()
            for name in METHODS[mth].method_options():
                if name in added:
                    continue
                added.add(name)
                values = {k: run_defaults(k, dataset)[0].get(name, "n/a") for k in known
                          if name in METHODS[k].method_options()}
                shown = next(iter(values.values()))
                extra = ""
                if len(set(map(repr, values.values()))) > 1:
                    extra = "; " + ", ".join(f"{k}: {v}" for k, v in values.items())
                from_recipe = name == "memory_size" and "memory_size" in recipe
                from_recipe |= any(name in recipe.get("methods", {}).get(k, {}) for k in known)
                source = note if from_recipe else ""
                _add_option(o, name, shown, annotations.get(name), method_docs.get(name, name), source + extra)
    return p


def parse_benchmark_args(
    argv: Sequence[str], prog: str = "retain benchmark", output: str = "runs/benchmark",
    customize: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The benchmark flags (with the options of every ``--method``), plus what ``customize`` adds."""
    from retain.benchmark import METHODS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", nargs="+", default=["er"])
    pre.add_argument("--dataset", default="digits")
    known, _ = pre.parse_known_args(argv)
    for method in known.method:
        if method not in METHODS:
            raise CLIError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if len(set(known.method)) != len(known.method):
        raise CLIError(f"--method lists a method twice: {' '.join(known.method)}")
    parser = _benchmark_parser(known.method, known.dataset, prog, output)
    if customize is not None:
        customize(parser)
    return parser.parse_args(argv)


def benchmark_config(args: argparse.Namespace, method: str | None = None) -> Any:
    """The ``BenchmarkConfig`` of parsed benchmark flags for ``method`` (default: the only
    ``--method``), with the dataset's recipe and the method's defaults for what is not given.
    With several methods each runs in ``OUTPUT/METHOD``."""
    from retain.benchmark import METHODS, BenchmarkConfig, run_defaults

    methods = list(args.method) if isinstance(args.method, list | tuple) else [args.method]
    if method is None:
        if len(methods) != 1:
            raise CLIError(f"this command runs one method, got --method {' '.join(methods)}")
        method = methods[0]
    recipe = RECIPES.get(args.dataset, {})
    defaults, training_defaults = run_defaults(method, args.dataset)
    method_options = {n: getattr(args, n) for n in METHODS[method].method_options() if getattr(args, n, None)
                      is not None}
    if "memory_size" in defaults:
        method_options.setdefault("memory_size", defaults["memory_size"])
    for name, value in recipe.get("methods", {}).get(method, {}).items():
        method_options.setdefault(name, value)
    training_options = {n: getattr(args, n) for n in TRAINING_FLAGS if getattr(args, n) is not None}
    for name, value in training_defaults.items():
        training_options.setdefault(name, value)
    if args.no_progress:
        training_options["progress_bar"] = False
    output = args.output if len(methods) == 1 else str(Path(args.output) / method)
    config = BenchmarkConfig(
        method=method, dataset=args.dataset, scenario=args.scenario, num_tasks=args.num_tasks,
        classes_per_task=args.classes_per_task, shuffle_classes=args.shuffle_classes, val_fraction=args.val_fraction,
        data_dir=args.data_dir, model=args.model or recipe.get("model", "mlp"), hidden_sizes=tuple(args.hidden_sizes),
        width=args.width, optimizer=args.optimizer,
        learning_rate=args.learning_rate if args.learning_rate is not None else recipe.get("learning_rate", 0.05),
        momentum=args.momentum, weight_decay=args.weight_decay, augment=args.augment, seeds=tuple(args.seeds),
        output=output, keep_all_states=args.keep_all_states, threads=args.threads, method_options=method_options,
        training_options=training_options,
    )
    return config


