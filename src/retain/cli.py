"""The ``retain`` command: ``benchmark``, ``update`` and ``evaluate``, thin over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import json
import sys
import traceback
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
  retain benchmark --method er derpp finetune --seed 0 1 2   several methods, one comparison.png
  retain tune --method er --search-space space.json --trials 20   (Syne Tune: `pip install -e '.[tune]'`)
"""

from retain.benchmark_recipes import RECIPES  # noqa: E402  (re-exported: the recipes moved)

TRAINING_FLAGS = ("batch_size", "max_epochs", "learning_rate_scheduler_interval", "precision", "accelerator",
                  "devices", "strategy", "gradient_clip_val", "gradient_clip_algorithm", "mask_unused_classes",
                  "mask_class_set", "metric", "mode", "early_stopping_enabled", "patience", "deterministic_trainer",
                  "log_every_n_steps", "checkpoint_every_n_epochs")
_TRAINING_FLAGS = TRAINING_FLAGS  # the former private name


class CLIError(Exception):
    """A user error, printed as one line without a traceback."""


def flag(name: str) -> str:
    """The command-line flag of option ``name`` (``--batch-size`` for ``batch_size``)."""
    return "--" + name.replace("_", "-")


_flag = flag  # the former private name


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


def _benchmark(argv: Sequence[str]) -> int:
    from retain.benchmark import run_benchmark, run_comparison

    args = parse_benchmark_args(argv)
    if len(args.method) == 1:
        run_benchmark(benchmark_config(args))
    else:
        run_comparison([benchmark_config(args, method) for method in args.method], args.output)
    return 0


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


# ---------------------------------------------------------------------------------------------- update
def load_config(path: str | Path) -> ModuleType:
    """Imports a user's Python config file (the user's own code, run as such)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"retain_user_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise CLIError(f"{path}:{err.lineno}: SyntaxError: {err.msg}: {(err.text or '').strip()}") from None
    except Exception as err:
        raise CLIError(config_error(path, err, "the module body")) from None
    return module


def config_error(path: str | Path, err: BaseException, called: str) -> str:
    """One line naming the config file, the line and the function of the user's code where ``err``
    was raised (the innermost frame in the config file), and the error."""
    where = str(path)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    if frames:
        last = frames[-1]
        function = "the module body" if last.name == "<module>" else f"{last.name}()"
        where = f"{path}:{last.lineno} in {function}"
    else:
        where = f"{path}, calling {called}"
    return f"{where}: {type(err).__name__}: {err}"


def call_config(path: str | Path, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Calls the config's ``name`` function, turning any error into one line naming file, line and function."""
    try:
        return fn(*args)
    except Exception as err:
        raise CLIError(config_error(path, err, f"{name}()")) from None


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


def update_parser() -> argparse.ArgumentParser:
    """The flags of ``retain update``."""
    p = argparse.ArgumentParser(prog="retain update", description="Run one update of your own model and data.",
                                epilog=CONFIG_CONVENTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Python config file (see below)")
    p.add_argument("--input-state", default=None, help="state folder of the previous update (omit for the first)")
    p.add_argument("--output-state", required=True, help="where to write the new state folder")
    p.add_argument("--method", default=None, help="overrides the config's METHOD")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    """The flags of ``retain evaluate``."""
    p = argparse.ArgumentParser(prog="retain evaluate", description="Accuracy of a saved state on your test data.",
                                epilog=CONFIG_CONVENTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, help="a state folder written by an update")
    p.add_argument("--config", required=True, help="Python config file providing test_dataset_fn()")
    p.add_argument("--output", default=None, help="optional JSON file for the result")
    return p


def parse_command(argv: Sequence[str]) -> argparse.Namespace:
    """Parses a whole ``retain`` command line (``argv`` without the program name) without running
    it: raises ``CLIError`` or ``SystemExit`` where ``retain`` would refuse it. The README's
    commands are checked with this."""
    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        argv = ["benchmark", *argv]
    command, rest = argv[0], argv[1:]
    if command == "benchmark":
        return parse_benchmark_args(rest)
    if command == "tune":
        from retain.tune import add_tune_arguments

        return parse_benchmark_args(rest, prog="retain tune", output="runs/tune", customize=add_tune_arguments)
    if command == "update":
        return update_parser().parse_args(rest)
    if command == "evaluate":
        return evaluate_parser().parse_args(rest)
    raise CLIError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")


def _update(argv: Sequence[str]) -> int:
    import torch

    from retain.benchmark import METHODS

    args = update_parser().parse_args(argv)
    config = load_config(args.config)
    method = args.method or getattr(config, "METHOD", None)
    if method not in METHODS:
        raise CLIError(f"unknown method {method!r} (from --method or the config's METHOD); "
                       f"choose one of: {', '.join(METHODS)}")
    path = args.config
    model = call_config(path, "model_fn", _config_function(config, "model_fn", path))
    train = call_config(path, "train_dataset_fn", _config_function(config, "train_dataset_fn", path))
    val_fn = _config_function(config, "val_dataset_fn", path, required=False)
    optimizer_fn = _config_function(config, "optimizer_fn", path, required=False)
    loss_fn = _config_function(config, "loss_fn", path, required=False)
    optimizer = optimizer_fn or functools.partial(torch.optim.SGD, lr=0.01)
    options = getattr(config, "UPDATER_OPTIONS", {})
    if not isinstance(options, dict):
        raise CLIError(f"{path}: UPDATER_OPTIONS must be a dict of updater keyword arguments, got "
                       f"{type(options).__name__}")
    options = dict(options)
    options.setdefault("progress_bar", True)
    try:
        updater = METHODS[method].updater(model, call_config(path, "loss_fn", loss_fn) if loss_fn else None,
                                          optimizer, input_state_folder=args.input_state,
                                          output_state_folder=args.output_state, **options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"{path}: UPDATER_OPTIONS for METHOD {method!r}: {err}") from None
    val = call_config(path, "val_dataset_fn", val_fn) if val_fn else None
    collate = _config_collate(config, args.config)
    from retain.updaters import distributed

    try:
        updater.update(train, val, train_dataset_collate_fn=collate, val_dataset_collate_fn=collate,
                       task_id=getattr(config, "TASK_ID", None))
    except BaseException:
        if distributed.dist.is_available() and distributed.dist.is_initialized():
            distributed.dist.destroy_process_group()  # no barrier: a peer may be gone
        raise
    launched = distributed.shutdown_process_group()  # torchrun: leave the group cleanly
    print(f"updated with {method}: state written to {args.output_state}")
    if launched:
        distributed.exit_launched_job(0)  # never abort at exit after a complete update
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

    args = evaluate_parser().parse_args(argv)
    config = load_config(args.config)
    test = call_config(args.config, "test_dataset_fn", _config_function(config, "test_dataset_fn", args.config))
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
