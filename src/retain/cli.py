"""The ``retain`` command: ``benchmark``, ``update`` and ``evaluate``, thin over the Python API."""

from __future__ import annotations

import argparse
import functools
import importlib.util
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

from retain.benchmark_flags import (  # noqa: E402  (re-exported: the flags live there)
    CLIError,
    benchmark_config,
    parse_benchmark_args,
)


def _benchmark(argv: Sequence[str]) -> int:
    from retain.benchmark import run_benchmark, run_comparison

    args = parse_benchmark_args(argv)
    if len(args.method) == 1:
        run_benchmark(benchmark_config(args))
    else:
        run_comparison([benchmark_config(args, method) for method in args.method], args.output)
    return 0


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
        from retain.version import __version__

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
