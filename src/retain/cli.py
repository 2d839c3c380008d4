"""The ``retain`` command: ``benchmark``, ``update`` and ``evaluate``, thin over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

_DESCRIPTION = """\
retain: continual learning that keeps what it learned.

  retain benchmark                      default benchmark: ER on scikit-learn digits, 5 tasks
  retain benchmark --method derpp --dataset mnist --memory-size 500 --seed 0 1 2
  retain benchmark --method er --help   every option of one method
  retain update --config my_config.py --input-state state/v1 --output-state state/v2
  retain evaluate --config my_config.py --state state/v2
  retain tune --method er --search-space space.json --trials 20   (needs `pip install retain[tune]`)
"""

# Per-dataset defaults for options the user does not give (the DER paper's protocol for MNIST).
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"batch_size": 10, "max_epochs": 5, "learning_rate": 0.05, "memory_size": 200},
    "mnist": {"batch_size": 10, "max_epochs": 1, "learning_rate": 0.03, "memory_size": 500},
    "fashion-mnist": {"batch_size": 10, "max_epochs": 1, "learning_rate": 0.03, "memory_size": 500},
    "cifar10": {"batch_size": 32, "max_epochs": 50, "learning_rate": 0.03, "memory_size": 500, "model": "resnet18"},
    "cifar100": {"batch_size": 32, "max_epochs": 50, "learning_rate": 0.03, "memory_size": 2000,
                 "model": "resnet18"},
}
_TRAINING_FLAGS = ("batch_size", "max_epochs", "learning_rate_scheduler_interval", "precision", "accelerator",
                   "devices", "strategy", "gradient_clip_val", "gradient_clip_algorithm", "mask_unused_classes",
                   "metric", "mode", "early_stopping_enabled", "deterministic_trainer", "log_every_n_steps",
                   "checkpoint_every_n_epochs")


class CLIError(Exception):
    """A user error, printed as one line without a traceback."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(default: Any, annotation: Any) -> type:
    if isinstance(default, bool):
        return bool
    if isinstance(default, int | float | str):
        return type(default)
    text = str(annotation)
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def _add_option(group: argparse._ArgumentGroup, name: str, default: Any, annotation: Any, help_text: str) -> None:
    kind = _type_of(default, annotation)
    if kind is bool:
        group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
    else:
        group.add_argument(_flag(name), dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                           help=f"{help_text} (default: {default})")


def _benchmark_parser(
    method: str | None, prog: str = "retain benchmark", output: str = "runs/benchmark"
) -> argparse.ArgumentParser:
    from retain.benchmark import METHODS, MODELS, OPTIMIZERS
    from retain.data import DATASET_NAMES, SCENARIO_NAMES
    from retain.options import TrainingOptions

    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a method over a continual scenario (each update from the previous state folder) and "
                    "write results.json, CSV tables and PNG plots to --output.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Method options: `retain benchmark --method NAME --help` lists every option of that method.\n"
               "Methods: " + ", ".join(f"{k} ({v.summary})" for k, v in METHODS.items()),
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--method", default="er", help=f"one of {', '.join(METHODS)} (default: er)")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASET_NAMES)} (default: digits, "
                   "built in, needs no files)")
    g.add_argument("--scenario", default="class-incremental", help=f"one of {', '.join(SCENARIO_NAMES)}")
    g.add_argument("--num-tasks", type=int, default=None, help="number of updates (default 5; 20 for permuted/rotated)")
    g.add_argument("--classes-per-task", type=int, default=None, help="alternative to --num-tasks")
    g.add_argument("--shuffle-classes", action="store_true", help="class order drawn from the seed")
    g.add_argument("--val-fraction", type=float, default=0.0, help="share of each task's train data held out")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $RETAIN_DATA_DIR or ~/.cache/retain/data)")
    g.add_argument("--seed", dest="seeds", type=int, nargs="+", default=[0], help="one or more seeds (mean ± std)")
    g.add_argument("--output", default=output, help=f"report and state folders (default: {output})")
    g.add_argument("--keep-all-states", action="store_true", help="keep every update's state folder")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for the MLP, whose tiny matrix products lose to threading)")
    m = p.add_argument_group("model and optimizer")
    m.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default: mlp; resnet18 for CIFAR)")
    m.add_argument("--hidden-sizes", type=int, nargs="+", default=[100, 100], help="MLP hidden sizes")
    m.add_argument("--width", type=int, default=20, help="ResNet-18 base width (64 standard, 20 reduced)")
    m.add_argument("--optimizer", default="sgd", help=f"one of {', '.join(OPTIMIZERS)}")
    m.add_argument("--learning-rate", type=float, default=None, help="learning rate (default from the dataset recipe)")
    m.add_argument("--momentum", type=float, default=0.0)
    m.add_argument("--weight-decay", type=float, default=0.0)
    m.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    t = p.add_argument_group("training options (every updater)")
    fields = {f.name: f for f in dataclasses.fields(TrainingOptions)}
    for name in _TRAINING_FLAGS:
        _add_option(t, name, fields[name].default, fields[name].type, name.replace("_", " "))
    if method in METHODS:
        o = p.add_argument_group(f"options of --method {method}")
        annotations: dict[str, Any] = {}
        for cls in (METHODS[method].updater, getattr(METHODS[method].updater, "learner_class", None)):
            if cls is not None:
                for n, par in inspect.signature(cls.__init__).parameters.items():
                    annotations.setdefault(n, par.annotation)
        for name, default in METHODS[method].method_options().items():
            _add_option(o, name, default, annotations.get(name), name.replace("_", " "))
    return p


def parse_benchmark_args(
    argv: Sequence[str], prog: str = "retain benchmark", output: str = "runs/benchmark",
    customize: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The benchmark flags (with the options of ``--method``), plus what ``customize`` adds."""
    from retain.benchmark import METHODS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="er")
    pre.add_argument("--dataset", default="digits")
    known, _ = pre.parse_known_args(argv)
    if known.method not in METHODS:
        raise CLIError(f"unknown method {known.method!r}; choose one of: {', '.join(METHODS)}")
    parser = _benchmark_parser(known.method, prog, output)
    if customize is not None:
        customize(parser)
    return parser.parse_args(argv)


def _benchmark(argv: Sequence[str]) -> int:
    from retain.benchmark import run_benchmark

    run_benchmark(benchmark_config(parse_benchmark_args(argv)))
    return 0


def benchmark_config(args: argparse.Namespace) -> Any:
    """The ``BenchmarkConfig`` of parsed benchmark flags, with the dataset's recipe for what is not given."""
    from retain.benchmark import METHODS, BenchmarkConfig

    recipe = RECIPES.get(args.dataset, {})
    method_options = {n: getattr(args, n) for n in METHODS[args.method].method_options() if getattr(args, n, None)
                      is not None}
    if "memory_size" in METHODS[args.method].method_options() and "memory_size" not in method_options:
        method_options["memory_size"] = recipe.get("memory_size", 500)
    training_options = {n: getattr(args, n) for n in _TRAINING_FLAGS if getattr(args, n) is not None}
    for name in ("batch_size", "max_epochs"):
        if name in recipe:
            training_options.setdefault(name, recipe[name])
    if args.no_progress:
        training_options["progress_bar"] = False
    config = BenchmarkConfig(
        method=args.method, dataset=args.dataset, scenario=args.scenario, num_tasks=args.num_tasks,
        classes_per_task=args.classes_per_task, shuffle_classes=args.shuffle_classes, val_fraction=args.val_fraction,
        data_dir=args.data_dir, model=args.model or recipe.get("model", "mlp"), hidden_sizes=tuple(args.hidden_sizes),
        width=args.width, optimizer=args.optimizer,
        learning_rate=args.learning_rate if args.learning_rate is not None else recipe.get("learning_rate", 0.05),
        momentum=args.momentum, weight_decay=args.weight_decay, augment=args.augment, seeds=tuple(args.seeds),
        output=args.output, keep_all_states=args.keep_all_states, threads=args.threads, method_options=method_options,
        training_options=training_options,
    )
    return config


# ---------------------------------------------------------------------------------------------- update
def load_config(path: str | Path) -> ModuleType:
    """Imports a user's Python config file (the user's own code, run as such)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"retain_user_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_function(config: ModuleType, name: str, path: str, required: bool = True) -> Any:
    fn = getattr(config, name, None)
    if fn is None:
        if required:
            provided = sorted(n for n in vars(config) if n.endswith("_fn"))
            raise CLIError(f"config {path} defines no {name}(); it defines {', '.join(provided) or 'no *_fn function'}")
        return None
    if not callable(fn):
        raise CLIError(f"config {path}: {name} must be a function")
    return fn


CONFIG_CONVENTION = """\
A config file is Python that defines:
  model_fn() -> retain.ContinualModel or any torch nn.Module returning logits (or .logits)
                                                 the model (weights are restored from --input-state;
                                                 `retain evaluate` loads a plain module's state into it)
  train_dataset_fn() -> Dataset or DataLoader    the new data of this update (map-style or iterable)
  val_dataset_fn() -> Dataset                    optional
  test_dataset_fn() -> Dataset                   for `retain evaluate` (read batch by batch)
  COLLATE_FN = fn                                optional: collates a list of items into a batch
                                                 (train, val and test), e.g. padding to the longest
  optimizer_fn(params) -> torch.optim.Optimizer  optional (default SGD lr 0.01)
  loss_fn() -> torch.nn.Module                   optional (default cross-entropy)
  METHOD = "er"                                  a method of `retain benchmark --help`
  UPDATER_OPTIONS = {...}                        the updater's keyword arguments (memory_size, max_epochs, ...)
  TASK_ID = None                                 optional head id
"""


def _update(argv: Sequence[str]) -> int:
    import torch

    from retain.benchmark import METHODS

    p = argparse.ArgumentParser(prog="retain update", description="Run one update of your own model and data.",
                                epilog=CONFIG_CONVENTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Python config file (see below)")
    p.add_argument("--input-state", default=None, help="state folder of the previous update (omit for the first)")
    p.add_argument("--output-state", required=True, help="where to write the new state folder")
    p.add_argument("--method", default=None, help="overrides the config's METHOD")
    args = p.parse_args(argv)
    config = load_config(args.config)
    method = args.method or getattr(config, "METHOD", None)
    if method not in METHODS:
        raise CLIError(f"unknown method {method!r} (from --method or the config's METHOD); "
                       f"choose one of: {', '.join(METHODS)}")
    model = _config_function(config, "model_fn", args.config)()
    train = _config_function(config, "train_dataset_fn", args.config)()
    val_fn = _config_function(config, "val_dataset_fn", args.config, required=False)
    optimizer_fn = _config_function(config, "optimizer_fn", args.config, required=False)
    loss_fn = _config_function(config, "loss_fn", args.config, required=False)
    optimizer = optimizer_fn or (lambda params: torch.optim.SGD(params, lr=0.01))
    options = dict(getattr(config, "UPDATER_OPTIONS", {}))
    options.setdefault("progress_bar", True)
    updater = METHODS[method].updater(model, loss_fn() if loss_fn else None, optimizer,
                                      input_state_folder=args.input_state, output_state_folder=args.output_state,
                                      **options)
    collate = _config_collate(config, args.config)
    updater.update(train, val_fn() if val_fn else None, train_dataset_collate_fn=collate,
                   val_dataset_collate_fn=collate, task_id=getattr(config, "TASK_ID", None))
    print(f"updated with {method}: state written to {args.output_state}")
    return 0


def _config_collate(config: ModuleType, path: str) -> Callable | None:
    collate = getattr(config, "COLLATE_FN", None)
    if collate is not None and not callable(collate):
        raise CLIError(f"config {path}: COLLATE_FN must be a function")
    return collate


def _evaluate(argv: Sequence[str]) -> int:
    from retain.evaluation import accuracy_on_dataset
    from retain.models.adapter import is_plain_description
    from retain.state import StateFolder
    from retain.updaters import load_model

    p = argparse.ArgumentParser(prog="retain evaluate", description="Accuracy of a saved state on your test data.",
                                epilog=CONFIG_CONVENTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, help="a state folder written by an update")
    p.add_argument("--config", required=True, help="Python config file providing test_dataset_fn()")
    p.add_argument("--output", default=None, help="optional JSON file for the result")
    args = p.parse_args(argv)
    config = load_config(args.config)
    test = _config_function(config, "test_dataset_fn", args.config)()
    transform = getattr(config, "TEST_TRANSFORM", None)
    fresh = None
    if is_plain_description(StateFolder(args.state).manifest["model"]):  # weights only: the config builds it
        fresh = _config_function(config, "model_fn", args.config)()
    model = load_model(args.state, model=fresh)
    try:  # streamed: one batch in memory at a time
        score, items = accuracy_on_dataset(model, test, collate_fn=_config_collate(config, args.config),
                                           transform=transform, batch_size=int(getattr(config, "EVAL_BATCH_SIZE", 256)),
                                           task_id=getattr(config, "TASK_ID", None))
    except ValueError as err:
        if "empty" in str(err):
            raise CLIError("test_dataset_fn() returned an empty dataset") from None
        raise
    result = {"state": str(args.state), "accuracy": score, "items": items}
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _tune(argv: Sequence[str]) -> int:
    from retain.tune import tune_command

    return tune_command(argv)


COMMANDS = {"benchmark": _benchmark, "update": _update, "evaluate": _evaluate, "tune": _tune}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_DESCRIPTION)
        print("commands: " + ", ".join(COMMANDS) + "   (`retain COMMAND --help` for details)")
        return 0
    if argv[0] == "--version":
        from retain import __version__

        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        if command.startswith("-"):  # `retain --method er` means the default command
            command, argv = "benchmark", ["benchmark", *argv]
        else:
            print(f"retain: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
    from retain.data import DatasetFileError
    from retain.state import StateError, os_error_message, printable

    try:
        return COMMANDS[command](argv[1:])
    except (CLIError, ValueError, TypeError, StateError, DatasetFileError) as err:
        print(f"retain {command}: error: {printable(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder, name too long, a file as parent, ...
        print(f"retain {command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
