"""Hyperparameter search over whole continual sequences: ``retain tune`` (Syne Tune).

Each trial runs a full benchmark sequence (``retain.benchmark.run_benchmark``) with
``score_on='val'``: every update trains on its task's train part, and the trial's score is the
average accuracy after the last update over all tasks' *validation* parts (``val_fraction`` of
each task's train data, held out). Test data is never read during a search.

The search runs on Syne Tune (``pip install -e '.[tune]'`` in a clone of retain): a scheduler proposes configurations,
a trial backend runs each as a process of ``python -m retain.tune_worker`` (the file
``retain/tune_worker.py``), which reports ``val_accuracy`` through ``syne_tune.Reporter``. The
local backend runs ``--workers`` trials at a time on this machine (rotating GPUs when there are
several); the same worker script runs unchanged on Syne Tune's other backends. A trial that
fails (its process raises or dies) is marked ``Failed`` in the table and the search goes on.

Search-space file (JSON): option name -> distribution, or a plain value fixed for all trials::

    {"learning_rate": {"type": "loguniform", "lower": 0.001, "upper": 0.3},
     "alpha": {"type": "uniform", "lower": 0.1, "upper": 1.0},
     "batch_memory_frac": {"type": "choice", "values": [0.25, 0.5]},
     "memory_size": {"type": "randint", "lower": 100, "upper": 500},
     "max_epochs": 1}

Names are those of ``retain benchmark`` (with ``_``): model and optimizer settings
(``learning_rate``, ``momentum``, ...), the method's own options (``alpha``, ``beta``,
``ema_memory_update_gamma``, ...) and training options (``batch_size``, ``max_epochs``, ...).
The output folder gets ``trials.csv`` (one row per trial), ``best_config.json`` (the best
trial's values, its full configuration and a ``retain benchmark`` command that retrains it on the
whole train parts and scores it on test data), ``base_config.json`` (what every trial starts from;
trials read it, so with a remote backend put ``--output`` where the workers can read it) and
Syne Tune's own logs under ``syne-tune/`` (each trial's stdout/stderr in ``syne-tune/NAME/ID/``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

METRIC = "val_accuracy"
BASE_KEY = "retain_base_config"  # path of the fixed benchmark configuration (JSON), a constant of every trial
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "loguniform": ("lower", "upper"),
    "uniform": ("lower", "upper"),
    "randint": ("lower", "upper"),
    "choice": ("values",),
}
# BenchmarkConfig fields a search may set; the others define the sequence and how it is scored.
CONFIG_OPTIONS = ("model", "hidden_sizes", "width", "optimizer", "learning_rate", "momentum", "weight_decay",
                  "augment")  # fmt: skip
INSTALL_HINT = (
    "syne-tune is not installed: run `pip install -e '.[tune]'` in the retain clone "
    "(or `pip install 'retain-cl[tune]'`; the PyPI package named `retain` is another project)"
)


# --------------------------------------------------------------------------------- search space
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_distribution(name: str, spec: dict[str, Any]) -> None:
    """Raises ValueError on a malformed distribution ``spec`` of option ``name``."""
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"search space: {name!r} has type {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    expected = {"type", *DISTRIBUTIONS[kind]}
    if set(spec) != expected:
        raise ValueError(f"search space: {name!r} ({kind}) needs exactly the keys {sorted(expected)}, "
                         f"got {sorted(spec)}")
    if kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values or not all(
            isinstance(v, str | bool) or _is_number(v) for v in values
        ):
            raise ValueError(f"search space: {name!r} (choice) needs a non-empty list of numbers, strings or "
                             "booleans as 'values'")
        return
    lower, upper = spec["lower"], spec["upper"]
    if not (_is_number(lower) and _is_number(upper)) or lower >= upper:
        raise ValueError(f"search space: {name!r} ({kind}) needs numbers lower < upper, got {lower!r}, {upper!r}")
    if kind == "loguniform" and lower <= 0:
        raise ValueError(f"search space: {name!r} (loguniform) needs lower > 0, got {lower!r}")
    if kind == "randint" and not (isinstance(lower, int) and isinstance(upper, int)):
        raise ValueError(f"search space: {name!r} (randint) needs integer bounds, got {lower!r}, {upper!r}")


def option_routes(method: str) -> dict[str, str]:
    """Every option name a search may set for ``method``, and where it goes: 'config' (a
    BenchmarkConfig field), 'method' (method_options) or 'training' (training_options)."""
    from retain.benchmark import METHODS
    from retain.benchmark_flags import TRAINING_FLAGS

    routes = {name: "config" for name in CONFIG_OPTIONS}
    for name in METHODS[method].method_options():
        routes.setdefault(name, "method")
    for name in (*TRAINING_FLAGS, "seed"):
        routes.setdefault(name, "training")
    routes.pop("seed")  # the seeds are the benchmark's --seed
    return routes


def load_search_space(path: str | Path, method: str) -> dict[str, Any]:
    """Reads and checks a search-space JSON file for ``method`` (see the module docstring)."""
    path = Path(path)
    try:
        space = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"search space file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"search space file {path} is not valid JSON: {err}") from None
    return check_search_space(space, method, where=str(path))


def check_search_space(space: Any, method: str, where: str = "search space") -> dict[str, Any]:
    """``space`` with ``-`` in names turned into ``_``, checked against ``method``'s options."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{where}: must be a non-empty JSON object mapping option names to distributions")
    routes = option_routes(method)
    checked: dict[str, Any] = {}
    for raw_name, spec in space.items():
        name = raw_name.replace("-", "_")
        if name not in routes:
            raise ValueError(f"{where}: {raw_name!r} is not an option of --method {method}; options: "
                             f"{', '.join(sorted(routes))}")
        if isinstance(spec, dict):
            check_distribution(name, spec)
        checked[name] = spec
    if not any(isinstance(spec, dict) for spec in checked.values()):
        raise ValueError(f"{where}: nothing to search (every entry is a fixed value)")
    return checked


def syne_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """Syne Tune's configuration space for a checked search space."""
    from syne_tune.config_space import choice, loguniform, randint, uniform

    makers: dict[str, Callable[..., Any]] = {"loguniform": loguniform, "uniform": uniform, "randint": randint}
    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            out[name] = spec
        elif spec["type"] == "choice":
            out[name] = choice(list(spec["values"]))
        else:
            out[name] = makers[spec["type"]](spec["lower"], spec["upper"])
    return out


# --------------------------------------------------------------------------------- one trial
def base_description(config: Any) -> dict[str, Any]:
    """The JSON form of the benchmark configuration a trial starts from (scored on validation)."""
    base = config.describe()
    base["score_on"] = "val"
    base["training_options"] = {**base["training_options"], "progress_bar": False}
    return base


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> Any:
    """The ``BenchmarkConfig`` of one trial: ``base`` with the trial's ``values`` in place."""
    from retain.benchmark import BenchmarkConfig

    routes = option_routes(base["method"])
    d = {k: v for k, v in base.items() if k in {f.name for f in fields(BenchmarkConfig)}}
    d["method_options"] = dict(d.get("method_options", {}))
    d["training_options"] = dict(d.get("training_options", {}))
    for name, value in values.items():
        where = routes.get(name)
        if where is None:
            raise ValueError(f"{name!r} is not an option of --method {base['method']}")
        if where == "config":
            d[name] = value
        else:
            d[f"{where}_options"][name] = value
    d["hidden_sizes"] = tuple(d["hidden_sizes"])
    d["seeds"] = tuple(d["seeds"])
    return BenchmarkConfig(**d)


def score(result: dict[str, Any]) -> float:
    """Average accuracy after the last update (mean over seeds for several seeds)."""
    value = result["mean"]["average_accuracy"] if "mean" in result else result["average_accuracy"]
    if value is None or not math.isfinite(value):
        raise ValueError(f"the trial's score is not a number: {value!r}")
    return float(value)


def run_trial(base: dict[str, Any], values: dict[str, Any], log: Callable[..., Any] | None = None) -> float:
    """Runs one trial's whole sequence (report and states in a temporary folder); returns its score."""
    from retain.benchmark import run_benchmark

    config = trial_config(base, values)
    if config.score_on != "val":
        raise ValueError("a tuning trial must be scored on validation data (score_on='val')")
    with tempfile.TemporaryDirectory(prefix="retain-trial-") as tmp:
        config.output = tmp
        return score(run_benchmark(config, log=log or (lambda *a: print(*a, file=sys.stderr))))


def trial_main(argv: Sequence[str] | None = None) -> int:
    """``python -m retain.tune_worker``: reads the trial's configuration (Syne Tune's JSON file,
    or ``--name value`` pairs), runs it and reports ``val_accuracy`` to Syne Tune."""
    from syne_tune import Reporter
    from syne_tune.constants import ST_CHECKPOINT_DIR, ST_CONFIG_JSON_FNAME_ARG

    report = Reporter()  # created first: its worker time is the trial's time
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) % 2:
        raise SystemExit(f"retain.tune_worker: expected --name value pairs, got {args}")
    pairs = {args[i].removeprefix("--"): args[i + 1] for i in range(0, len(args), 2)}
    pairs.pop(ST_CHECKPOINT_DIR, None)
    if ST_CONFIG_JSON_FNAME_ARG in pairs:
        config = json.loads(Path(pairs.pop(ST_CONFIG_JSON_FNAME_ARG)).read_text())
    else:
        config = {k: _parse_value(v) for k, v in pairs.items()}
    base = json.loads(Path(config.pop(BASE_KEY)).read_text())
    report(**{METRIC: run_trial(base, config)})
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --------------------------------------------------------------------------------- the search
@dataclass
class TuneResult:
    """All trials (one dict per trial: trial_id, status, the searched values, val_accuracy,
    seconds) and the best completed one (``None`` when none completed)."""

    rows: list[dict[str, Any]]
    names: list[str]
    best: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)


def require_syne_tune() -> None:
    """Raises ImportError with the install hint when syne-tune is missing."""
    try:
        import syne_tune  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def random_configurations(config_space: dict[str, Any], trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` configurations drawn from ``config_space`` with a generator of their own, so that a
    search is reproducible from ``seed`` (Syne Tune 0.16's random searcher draws from the global
    numpy generator, which other code also uses)."""
    import numpy as np

    random_state = np.random.RandomState(seed)
    return [
        {k: _plain(v.sample(random_state=random_state)) if hasattr(v, "sample") else v for k, v in config_space.items()}
        for _ in range(trials)
    ]


def _random_search(config_space: dict[str, Any], trials: int, seed: int) -> Any:
    """Syne Tune's random search over the ``trials`` configurations of ``random_configurations``,
    then no more (the Tuner then waits for the running trials and stops)."""
    from syne_tune.optimizer.baselines import RandomSearch

    class CappedRandomSearch(RandomSearch):
        def __init__(self) -> None:
            points = random_configurations(config_space, trials, seed)
            super().__init__(config_space, metrics=[METRIC], do_minimize=False, random_seed=seed,
                             points_to_evaluate=points)
            self.proposed = 0

        def suggest(self) -> Any:
            if self.proposed >= trials:
                return None
            self.proposed += 1
            return super().suggest()

    return CappedRandomSearch()


def tune(
    config: Any,
    space: dict[str, Any],
    trials: int,
    output: str | Path,
    max_wallclock: float | None = None,
    workers: int = 1,
    seed: int = 0,
) -> TuneResult:
    """Searches ``space`` with ``trials`` random-search trials of ``config`` (a BenchmarkConfig with
    ``val_fraction > 0``) and writes ``trials.csv`` and ``best_config.json`` under ``output``."""
    require_syne_tune()
    import torch
    from syne_tune import StoppingCriterion, Tuner
    from syne_tune.backend import LocalBackend

    if trials < 1 or workers < 1:
        raise ValueError("--trials and --workers must be at least 1")
    if max_wallclock is not None and max_wallclock <= 0:
        raise ValueError("--max-wallclock must be > 0 seconds")
    if not config.val_fraction > 0:
        raise ValueError("tuning scores on the validation parts: give --val-fraction > 0 (e.g. 0.2)")
    space = check_search_space(space, config.method)
    base = base_description(config)
    trial_config(base, {})  # a wrong fixed setting fails here, not in every trial
    output = Path(output).absolute()
    output.mkdir(parents=True, exist_ok=True)
    base_file = output / "base_config.json"
    base_file.write_text(json.dumps(base, indent=2) + "\n")
    config_space = {**syne_tune_space(space), BASE_KEY: str(base_file)}
    names = [n for n, spec in space.items() if isinstance(spec, dict)]
    worker = Path(__file__).resolve().with_name("tune_worker.py")  # run as a script by Syne Tune
    with _environment(SYNETUNE_FOLDER=str(output / "syne-tune")):
        backend = LocalBackend(
            entry_point=str(worker),
            pass_args_as_json=True,
            rotate_gpus=torch.cuda.device_count() > 1,
        )
        tuner = Tuner(
            trial_backend=backend,
            scheduler=_random_search(config_space, trials, seed),
            stop_criterion=StoppingCriterion(max_wallclock_time=max_wallclock),
            n_workers=min(workers, trials),
            sleep_time=0.5,
            max_failures=trials,  # a failed trial is recorded and the search goes on
            tuner_name=f"retain-{config.method}-{config.dataset}",
            save_tuner=False,
        )
        tuner.run()
    rows = _rows(tuner.tuning_status.trial_rows.values(), names)
    completed = [r for r in rows if r["status"] == "Completed" and r[METRIC] is not None]
    best = max(completed, key=lambda r: r[METRIC]) if completed else None
    result = TuneResult(rows=rows, names=names, best=best)
    result.files["trials"] = output / "trials.csv"
    result.files["trials"].write_text(trials_csv(result))
    if best is not None:
        result.files["best"] = output / "best_config.json"
        fixed = {n: spec for n, spec in space.items() if not isinstance(spec, dict)}
        values = {**fixed, **{n: best[n] for n in names}}
        best_config = trial_config(base, values)
        # the final run: scored on test data, trained on the whole train parts (no validation held out)
        best_config.output, best_config.score_on, best_config.val_fraction = "runs/benchmark", "test", 0.0
        document = {
            "metric": METRIC,
            "score_on": "val",
            METRIC: best[METRIC],
            "trial_id": best["trial_id"],
            "hyperparameters": {n: best[n] for n in names},
            "config": best_config.describe(),
            "command": benchmark_command(best_config),
        }
        result.files["best"].write_text(json.dumps(document, indent=2) + "\n")
    return result


def _rows(raw: Any, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in raw:
        value = r.get(METRIC)
        seconds = r.get("worker-time", r.get("st_worker_time"))
        row = {"trial_id": int(r["trial_id"]), "status": str(r["status"])}
        row.update({n: _plain(r.get(n)) for n in names})
        row[METRIC] = float(value) if value is not None else None
        row["seconds"] = float(seconds) if seconds is not None else None
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _plain(value: Any) -> Any:
    """numpy scalars (Syne Tune's samples) as plain Python values."""
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------------- output
def trials_csv(result: TuneResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["trial_id", "status", *result.names, METRIC, "seconds"]
    writer.writerow(header)
    for row in result.rows:
        writer.writerow(["" if row[h] is None else row[h] for h in header])
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_markdown(result: TuneResult) -> str:
    """The trials as a markdown table (validation accuracy in %, the best marked with *)."""
    header = ["trial", "status", *result.names, "val accuracy (%)", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result.rows:
        value = row[METRIC]
        shown = "" if value is None else f"{100 * value:.2f}" + (" *" if row is result.best else "")
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        cells = [str(row["trial_id"]), row["status"], *[_fmt(row[n]) for n in result.names], shown, seconds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark_command(config: Any) -> str:
    """A ``retain benchmark`` command line that runs ``config`` (scored on test data)."""
    from retain.benchmark_flags import flag as _flag

    parts = ["retain", "benchmark", "--method", config.method, "--dataset", config.dataset,
             "--scenario", config.scenario]  # fmt: skip
    for name in ("num_tasks", "classes_per_task", "data_dir"):
        if getattr(config, name) is not None:
            parts += [_flag(name), str(getattr(config, name))]
    if config.shuffle_classes:
        parts.append("--shuffle-classes")
    if config.val_fraction:
        parts += ["--val-fraction", str(config.val_fraction)]
    parts += ["--seed", *map(str, config.seeds), "--model", config.model]
    if config.model == "mlp":
        parts += ["--hidden-sizes", *map(str, config.hidden_sizes)]
    else:
        parts += ["--width", str(config.width)]
    parts += ["--optimizer", config.optimizer]
    for name in ("learning_rate", "momentum", "weight_decay"):
        parts += [_flag(name), repr(getattr(config, name))]
    if config.augment:
        parts.append("--augment")
    for name, value in {**config.method_options, **config.training_options}.items():
        if name == "progress_bar":
            continue
        if isinstance(value, bool):
            parts.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif value is not None:
            parts += [_flag(name), repr(value) if isinstance(value, float) else str(value)]
    return " ".join(parts)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the search flags of ``retain tune`` to the benchmark parser."""
    parser.description = (
        "Search a method's hyperparameters over whole continual sequences with Syne Tune: each trial runs "
        "the sequence and is scored by the average accuracy after the last update on the tasks' validation "
        "parts (never on test data). Writes trials.csv and best_config.json to --output."
    )
    parser.set_defaults(val_fraction=0.2, no_progress=True)
    s = parser.add_argument_group("search")
    s.add_argument("--search-space", required=True, metavar="FILE",
                   help='JSON: {"learning_rate": {"type": "loguniform", "lower": 0.001, "upper": 0.3}, ...}; '
                        "types loguniform, uniform, randint (lower, upper), choice (values)")
    s.add_argument("--trials", type=int, default=10, help="number of trials (default: 10)")
    s.add_argument("--max-wallclock", type=float, default=None, metavar="SECONDS",
                   help="stop the search (and stop running trials) after this many seconds")
    s.add_argument("--workers", type=int, default=1, help="trials run at the same time (default: 1)")


def tune_command(argv: Sequence[str]) -> int:
    """``retain tune``: parses the benchmark flags plus the search flags, runs the search, prints the table."""
    from retain.benchmark_flags import CLIError, benchmark_config, parse_benchmark_args

    if not any(a in ("-h", "--help") for a in argv):
        try:
            require_syne_tune()
        except ImportError as err:
            raise CLIError(str(err)) from None
    args = parse_benchmark_args(argv, prog="retain tune", output="runs/tune", customize=add_tune_arguments)
    if len(args.method) != 1:
        raise CLIError(f"retain tune searches one method at a time, got --method {' '.join(args.method)}")
    config = benchmark_config(args)
    space = load_search_space(args.search_space, config.method)
    result = tune(config, space, trials=args.trials, output=args.output, max_wallclock=args.max_wallclock,
                  workers=args.workers, seed=config.seeds[0])
    print()
    print(f"retain tune: {config.method} on {config.dataset}, {len(result.rows)} trials, scored on the validation "
          f"parts (val_fraction {config.val_fraction})")
    print(trials_markdown(result))
    print(f"trials table: {result.files['trials']}")
    failed = [r["trial_id"] for r in result.rows if r["status"] == "Failed"]
    if failed:
        print(f"failed trials {failed}: see their std.err under {Path(args.output) / 'syne-tune'}")
    if result.best is None:
        raise CLIError("no trial completed, so there is no best configuration")
    print(f"best: trial {result.best['trial_id']}, val accuracy {100 * result.best[METRIC]:.2f}% -> "
          f"{result.files['best']}")
    return 0


__all__ = [
    "DISTRIBUTIONS",
    "METRIC",
    "TuneResult",
    "benchmark_command",
    "check_search_space",
    "load_search_space",
    "run_trial",
    "trial_config",
    "trial_main",
    "tune",
    "tune_command",
]
