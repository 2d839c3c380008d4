"""Report of a continual-learning run: ``results.json``, CSV files, plots, terminal table.

Result schema
=============

All accuracies and metrics are fractions in ``[0, 1]`` (metrics can be negative); files
and tables for people show them in percent. ``T`` is the number of tasks (= updates).
``NaN`` is written to JSON as ``null``.

Single run (what :func:`build_result` returns)
----------------------------------------------

======================== ======================= ==================================================
field                    type                    meaning
======================== ======================= ==================================================
``config``               dict                    run configuration, free-form but JSON-serialisable;
                                                 ``method``, ``dataset`` and ``scenario`` (strings)
                                                 are used in plot and table titles when present
``accuracy_matrix``      list[list[float|null]]  ``T x T``; ``[i][j]`` = accuracy on the test split of
                                                 task ``j`` after update ``i`` (training on task
                                                 ``i``); ``null`` = not evaluated
``average_accuracy``     float                   ``mean_j R[T-1][j]`` (GEM ACC)
``backward_transfer``    float                   ``1/(T-1) sum_{j<T-1} R[T-1][j] - R[j][j]`` (GEM BWT)
``forward_transfer``     float | null            ``1/(T-1) sum_{j>=1} R[j-1][j] - b[j]`` (GEM FWT);
                                                 ``null`` when ``initial_accuracy`` is unknown;
                                                 negative by construction in class-incremental
                                                 runs (R[j-1][j] ~ 0: unseen classes are never
                                                 predicted; b[j] ~ chance)
``average_forgetting``   float                   ``1/(T-1) sum_{j<T-1} max_{j<=l<=T-2} R[l][j] -
                                                 R[T-1][j]`` (Chaudhry et al. 2018)
``train_seconds``        list[float]             length ``T``; wall-clock training seconds of update
                                                 ``i`` (evaluation excluded)
``initial_accuracy``     list[float], optional   length ``T``; ``b[j]``, accuracy on task ``j`` of the
                                                 model at initialisation (before any update)
``task_ids``             list[str], optional     length ``T``; task names, used as axis labels
``seed``                 int, optional           random seed of the run
``task_classes``         list[list[int]], opt.   the classes of each task, as the scenario resolved
                                                 them (``retain benchmark`` writes it)
``versions``             dict, optional          top level: versions of retain, torch, numpy and
                                                 Python that produced the result
======================== ======================= ==================================================

Any other field is kept as given. Metric formulas: :mod:`retain.evaluation.metrics`.

Several seeds (what :func:`build_multi_seed_result` returns)
------------------------------------------------------------

============ ============== ============================================================
field        type           meaning
============ ============== ============================================================
``config``   dict           configuration shared by the runs (as above, without the seed)
``seeds``    list[int]      seed of each run, same order as ``runs``
``n_runs``   int            ``len(runs)``
``runs``     list[dict]     one single-run result (schema above) per seed
``mean``     dict           mean over runs of ``average_accuracy``, ``backward_transfer``,
                            ``forward_transfer``, ``average_forgetting``,
                            ``train_seconds_total`` (float: per-run sum of
                            ``train_seconds``), any other numeric per-run field, and,
                            elementwise, ``accuracy_matrix`` (``T x T``), ``train_seconds``
                            (length ``T``) and ``initial_accuracy`` (length ``T``, when
                            present); a field is ``null`` if it is ``null`` or missing in some run
``std``      dict           same fields as ``mean``: sample standard deviation over runs
                            (``ddof=1``), ``0.0`` when there is a single run
``task_ids`` list[str]      optional, as above
============ ============== ============================================================

A result is treated as multi-seed when it has both ``runs`` and ``mean``.

Files written by :func:`write_report`
-------------------------------------

* ``results.json`` -- the result dict (indent 2), written first.
* ``accuracy_matrix.csv`` -- header ``after_update,task0,...,task{T-1}``, one row per update
  ``i`` (first column ``i``), fractions with 4 decimals, empty cell = not evaluated.
  Multi-seed: the mean matrix, plus ``accuracy_matrix_std.csv`` with the std.
* ``metrics.csv`` -- header ``metric,value`` (multi-seed: ``metric,mean,std``), one row per
  metric of :data:`~retain.evaluation.metrics.METRIC_KEYS` plus ``train_seconds_total``;
  fractions with 6 decimals (seconds for the last), empty = not available.
* ``accuracy_matrix.png`` -- heatmap of the (mean) matrix in %, tasks not yet trained on
  (``j > i``) hatched and lightened; multi-seed cells show ``mean ± std``.
* ``task_accuracy.png`` -- accuracy on each task across updates from the update that
  learned it, and the average over seen tasks (thick line); multi-seed: mean with ±std
  shading.

Every file is written to a temporary file in ``output_dir`` and moved into place with
``os.replace``, so readers never see a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from retain.evaluation.metrics import METRIC_KEYS, aggregate_runs, summarize
from retain.state import replace_file

__all__ = [
    "build_multi_seed_result",
    "build_result",
    "format_comparison",
    "format_table",
    "is_multi_seed",
    "seen_task_average",
    "write_comparison",
    "write_report",
]

RESULTS_JSON = "results.json"
MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_STD_CSV = "accuracy_matrix_std.csv"
METRICS_CSV = "metrics.csv"
MATRIX_PNG = "accuracy_matrix.png"
CURVES_PNG = "task_accuracy.png"

_METRIC_LABELS = {
    "average_accuracy": ("Average accuracy", "%"),
    "backward_transfer": ("Backward transfer", "pp"),
    "forward_transfer": ("Forward transfer", "pp"),
    "average_forgetting": ("Average forgetting", "pp"),
}
_METRIC_SHORT = {
    "average_accuracy": "ACC",
    "backward_transfer": "BWT",
    "forward_transfer": "FWT",
    "average_forgetting": "Forgetting",
}


# --------------------------------------------------------------------------- building


def _json_types(obj: Any) -> Any:
    """Plain JSON types: numpy/torch values to Python, Path to str, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _json_types(v) for k, v in obj.items()}
    if isinstance(obj, str | bool) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors
        return _json_types(obj.tolist())
    if isinstance(obj, Sequence | set | frozenset):
        return [_json_types(v) for v in obj]
    raise TypeError(f"cannot write {type(obj).__name__} to results.json: {obj!r}")


def build_result(
    accuracy_matrix: ArrayLike,
    *,
    config: Mapping[str, Any],
    train_seconds: Sequence[float],
    initial_accuracy: Sequence[float] | None = None,
    task_ids: Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Single-run result dict (schema in the module docstring) with all metrics computed.

    ``extra`` fields (e.g. ``seed=0``) are added as given.
    """
    R = np.array(accuracy_matrix, dtype=np.float64)
    T = R.shape[0]
    if len(train_seconds) != T:
        raise ValueError(f"train_seconds must have one entry per update ({T}), got {len(train_seconds)}")
    if task_ids is not None and len(task_ids) != T:
        raise ValueError(f"task_ids must have one entry per task ({T}), got {len(task_ids)}")
    result: dict[str, Any] = {"config": _json_types(config), "accuracy_matrix": _json_types(R)}
    result.update(summarize(R, initial_accuracy))
    result["train_seconds"] = [float(s) for s in train_seconds]
    if initial_accuracy is not None:
        result["initial_accuracy"] = _json_types(np.asarray(initial_accuracy, dtype=np.float64))
    if task_ids is not None:
        result["task_ids"] = [str(t) for t in task_ids]
    result.update(_json_types(extra))
    return result


def build_multi_seed_result(
    runs: Sequence[Mapping[str, Any]],
    *,
    seeds: Sequence[int],
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Multi-seed result dict: the per-seed ``runs`` plus their ``mean`` and ``std``.

    ``config`` defaults to the first run's config; ``task_ids`` is copied from the first
    run when present.
    """
    if len(seeds) != len(runs):
        raise ValueError(f"got {len(seeds)} seeds for {len(runs)} runs")
    agg = aggregate_runs(runs)
    result: dict[str, Any] = {
        "config": _json_types(config if config is not None else runs[0].get("config", {})),
        "seeds": [int(s) for s in seeds],
        "n_runs": agg["n_runs"],
        "runs": [_json_types(r) for r in runs],
        "mean": agg["mean"],
        "std": agg["std"],
    }
    if runs and runs[0].get("task_ids") is not None:
        result["task_ids"] = list(runs[0]["task_ids"])
    return result


def is_multi_seed(result: Mapping[str, Any]) -> bool:
    """True when ``result`` follows the multi-seed schema (has ``runs`` and ``mean``)."""
    return "runs" in result and "mean" in result


# --------------------------------------------------------------------------- reading


class _View:
    """What the writers and plots need from a single- or multi-seed result."""

    def __init__(self, result: Mapping[str, Any]) -> None:
        self.multi = is_multi_seed(result)
        self.config: Mapping[str, Any] = result.get("config") or {}
        if self.multi:
            mean, std = result["mean"], result["std"]
            runs = result["runs"]
            self.n_runs = len(runs)
            if mean.get("accuracy_matrix") is None:
                raise ValueError("multi-seed result has no mean.accuracy_matrix")
            self.R = np.array(mean["accuracy_matrix"], dtype=np.float64)
            self.R_std: np.ndarray | None = np.array(std["accuracy_matrix"], dtype=np.float64)
            self.run_matrices = [np.array(r["accuracy_matrix"], dtype=np.float64) for r in runs]
            self.metrics = {k: mean.get(k) for k in METRIC_KEYS}
            self.metrics_std: dict[str, Any] | None = {k: std.get(k) for k in METRIC_KEYS}
            self.train_total = mean.get("train_seconds_total")
            self.train_total_std = std.get("train_seconds_total")
            task_ids = result.get("task_ids") or (runs[0].get("task_ids") if runs else None)
        else:
            if result.get("accuracy_matrix") is None:
                raise ValueError("result has no accuracy_matrix")
            self.n_runs = 1
            self.R = np.array(result["accuracy_matrix"], dtype=np.float64)
            self.R_std = None
            self.run_matrices = [self.R]
            computed = summarize(self.R, result.get("initial_accuracy"))
            self.metrics = {k: result[k] if k in result else computed[k] for k in METRIC_KEYS}
            self.metrics_std = None
            ts = result.get("train_seconds")
            self.train_total = None if ts is None else float(np.sum(np.asarray(ts, dtype=np.float64)))
            self.train_total_std = None
            task_ids = result.get("task_ids")
        if self.R.ndim != 2 or self.R.shape[0] != self.R.shape[1]:
            raise ValueError(f"accuracy matrix must be square, got shape {self.R.shape}")
        self.T = self.R.shape[0]
        if task_ids is not None and len(task_ids) == self.T:
            self.task_labels = [str(t) for t in task_ids]
        else:
            self.task_labels = [f"task{j}" for j in range(self.T)]

    def title(self) -> str:
        parts = []
        for key in ("method", "dataset", "scenario"):
            v = self.config.get(key)
            if isinstance(v, Mapping):
                v = v.get("name")
            if v is not None and v != "":
                parts.append(str(v))
        return " · ".join(parts) if parts else "Continual-learning run"

    def seeds_note(self) -> str:
        return f"mean ± std over {self.n_runs} seeds" if self.multi else ""


def _fmt_metric(v: Any, s: Any = None, *, decimals: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    text = f"{100 * v:.{decimals}f}"
    if s is not None:
        text += f" ± {100 * s:.{decimals}f}"
    return text


def _fmt_seconds(v: Any, s: Any = None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f} ± {s:.1f} s" if s is not None else f"{v:.1f} s"


# --------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    replace_file(path, lambda f: f.write(text.encode("utf-8")))


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _cell(v: float, decimals: int) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{decimals}f}"


def _matrix_csv(R: np.ndarray) -> str:
    T = R.shape[0]
    rows: list[list[Any]] = [["after_update", *[f"task{j}" for j in range(T)]]]
    rows += [[i, *[_cell(float(v), 4) for v in R[i]]] for i in range(T)]
    return _csv_text(rows)


def _metrics_csv(view: _View) -> str:
    def num(v: Any, decimals: int) -> str:
        return "" if v is None else _cell(float(v), decimals)

    names = [*METRIC_KEYS, "train_seconds_total"]
    values = [*(view.metrics[k] for k in METRIC_KEYS), view.train_total]
    if view.multi:
        assert view.metrics_std is not None
        stds = [*(view.metrics_std[k] for k in METRIC_KEYS), view.train_total_std]
        rows: list[list[Any]] = [["metric", "mean", "std"]]
        for i, (n, v, s) in enumerate(zip(names, values, stds, strict=True)):
            d = 3 if i == len(names) - 1 else 6
            rows.append([n, num(v, d), num(s, d)])
    else:
        rows = [["metric", "value"]]
        for i, (n, v) in enumerate(zip(names, values, strict=True)):
            rows.append([n, num(v, 3 if i == len(names) - 1 else 6)])
    return _csv_text(rows)


def _save_figure(fig: Any, path: Path) -> None:
    replace_file(path, lambda f: fig.savefig(f, format="png", dpi=150))


def write_report(output_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``results.json``, the CSV files and the two PNG plots of ``result``.

    ``result`` follows the single-run or multi-seed schema of this module's docstring.
    ``output_dir`` is created if needed. ``results.json`` is written first, so the numbers
    are saved even if plotting fails. Returns ``{file name: path}`` of every file written.
    """
    view = _View(result)  # validate before writing anything
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def put(name: str, text: str) -> None:
        paths[name] = out / name
        _write_text(paths[name], text)

    put(RESULTS_JSON, json.dumps(_json_types(result), indent=2, allow_nan=False) + "\n")
    put(MATRIX_CSV, _matrix_csv(view.R))
    if view.multi and view.R_std is not None:
        put(MATRIX_STD_CSV, _matrix_csv(view.R_std))
    put(METRICS_CSV, _metrics_csv(view))

    for name, plot in ((MATRIX_PNG, _plot_matrix), (CURVES_PNG, _plot_task_curves)):
        fig = plot(view)
        paths[name] = out / name
        _save_figure(fig, paths[name])
    return paths


# --------------------------------------------------------------------------- plots


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A figure with its own Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _metrics_line(view: _View) -> str:
    parts = []
    for k in METRIC_KEYS:
        s = view.metrics_std[k] if view.metrics_std is not None else None
        unit = "%" if k == "average_accuracy" else " pp"
        v = _fmt_metric(view.metrics[k], s, decimals=1)
        parts.append(f"{_METRIC_SHORT[k]} {v}{unit if v != 'n/a' else ''}")
    line = "   ".join(parts)
    return f"{line}\n({view.seeds_note()})" if view.multi else line


def _tick_step(T: int) -> int:
    return max(1, math.ceil(T / 20))


def _plot_matrix(view: _View) -> Any:
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    T = view.T
    side = min(max(4.5, 0.75 * T + 2.5), 16.0)
    fig = _new_figure((side + 1.3, side + 0.6))
    ax = fig.add_subplot()
    pct = 100.0 * view.R
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    norm = Normalize(vmin=0.0, vmax=100.0)
    im = ax.imshow(np.ma.masked_invalid(pct), cmap=cmap, norm=norm, interpolation="nearest")

    unseen_face = (1.0, 1.0, 1.0, 0.55)
    for i in range(T):
        for j in range(i + 1, T):
            ax.add_patch(
                Rectangle(
                    (j - 0.5, i - 0.5),
                    1,
                    1,
                    facecolor=unseen_face,
                    edgecolor=(0.45, 0.45, 0.45, 0.5),
                    hatch="//",
                    linewidth=0,
                )
            )

    if T <= 25:
        multi = view.R_std is not None
        cell_pt = 72.0 * 0.8 * side / T  # approximate cell side in points
        size = min(10.0, 0.8 * cell_pt / (0.6 * 4.5))
        if multi:
            size = min(9.0, 0.8 * cell_pt / (0.6 * 5.0), cell_pt / 3.2)
        size = max(size, 4.0)
        for i in range(T):
            for j in range(T):
                v = pct[i, j]
                if not math.isfinite(v):
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="0.3")
                    continue
                text = f"{v:.1f}"
                if multi:
                    assert view.R_std is not None
                    s = 100.0 * view.R_std[i, j]
                    if math.isfinite(s):
                        text += f"\n±{s:.1f}"
                r, g, b, _ = cmap(norm(v))
                if j > i:  # blended with the white overlay
                    r, g, b = (0.45 * c + 0.55 for c in (r, g, b))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if dark else "black",
                    linespacing=1.0,
                )

    step = _tick_step(T)
    ticks = list(range(0, T, step))
    ax.set_xticks(
        ticks,
        [view.task_labels[t] for t in ticks],
        rotation=45 if T > 6 else 0,
        ha="right" if T > 6 else "center",
    )
    ax.set_yticks(ticks, [view.task_labels[t] for t in ticks])
    ax.set_xlabel("Task evaluated (j)")
    ax.set_ylabel("After training on task (i)")
    ax.set_title(_metrics_line(view), fontsize=9)
    fig.suptitle(f"Accuracy matrix: {view.title()}", fontweight="bold")
    fig.colorbar(im, ax=ax, label="Accuracy (%)", shrink=0.85)
    if T > 1:
        fig.legend(
            handles=[Patch(facecolor="0.8", edgecolor="0.45", hatch="//", label="task not yet trained on (j > i)")],
            loc="outside lower center",
            frameon=False,
            fontsize=8,
        )
    return fig


def _plot_task_curves(view: _View) -> Any:
    import matplotlib

    T = view.T
    width = min(max(7.0, 0.45 * T + 5.0), 18.0)
    fig = _new_figure((width, 5.0))
    ax = fig.add_subplot()
    pct = 100.0 * view.R
    std = 100.0 * view.R_std if view.R_std is not None else None
    colors = matplotlib.colormaps["tab10" if T <= 10 else "tab20" if T <= 20 else "turbo"]
    x_all = np.arange(T)

    for j in range(T):
        color = colors(j % 10 if T <= 10 else j % 20 if T <= 20 else j / max(T - 1, 1))
        xs = x_all[j:]
        ys = pct[j:, j]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, color=color, label=view.task_labels[j])
        if std is not None:
            s = std[j:, j]
            ax.fill_between(xs, ys - s, ys + s, color=color, alpha=0.18, linewidth=0)

    # average over seen tasks, per run, then mean/std across runs
    seen_avg = (
        np.array([[np.nanmean(R[i, : i + 1]) for i in range(T)] for R in view.run_matrices], dtype=np.float64) * 100.0
    )
    avg = seen_avg.mean(axis=0)
    ax.plot(
        x_all,
        avg,
        color="black",
        linewidth=3.2,
        marker="s",
        markersize=5,
        label="average over seen tasks",
        zorder=5,
    )
    if view.multi and seen_avg.shape[0] > 1:
        s = seen_avg.std(axis=0, ddof=1)
        ax.fill_between(x_all, avg - s, avg + s, color="black", alpha=0.15, linewidth=0, zorder=4)

    step = _tick_step(T)
    ticks = list(range(0, T, step))
    ax.set_xticks(
        ticks,
        [view.task_labels[t] for t in ticks],
        rotation=45 if T > 8 else 0,
        ha="right" if T > 8 else "center",
    )
    ax.set_xlim(-0.3, T - 0.7)
    shown = [pct[j:, j] for j in range(T)] + [avg]
    if std is not None:
        shown += [pct[j:, j] - std[j:, j] for j in range(T)]
    ax.set_ylim(*_accuracy_limits(np.concatenate(shown)))
    ax.set_xlabel("After training on task")
    ax.set_ylabel("Accuracy (%)")
    ax.grid(True, alpha=0.3)
    subtitle = "Accuracy on each task from the update that learned it"
    if view.multi:
        subtitle += f" ({view.seeds_note()}, shaded)"
    ax.set_title(subtitle, fontsize=9)
    fig.suptitle(f"Task accuracy: {view.title()}", fontweight="bold")
    ncol = max(1, math.ceil((T + 1) / 16))
    ax.legend(title="Task", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=ncol, frameon=False)
    return fig


def _accuracy_limits(values: np.ndarray) -> tuple[float, float]:
    """y-axis limits in % that show the data's range (not always 0-100): from 5 points under the
    lowest value, rounded down to a multiple of 10, to just above 100."""
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    return max(0.0, 10.0 * math.floor((low - 5.0) / 10.0)) - 1.0, 101.0


def seen_task_average(result: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Average accuracy on the tasks seen so far after each update, per run: (mean, std over
    runs) of ``mean_{j<=i} R[i][j]``, each of length T (std 0 for a single run)."""
    view = _View(result)
    per_run = np.array(
        [[np.nanmean(R[i, : i + 1]) for i in range(view.T)] for R in view.run_matrices], dtype=np.float64
    )
    std = per_run.std(axis=0, ddof=1) if per_run.shape[0] > 1 else np.zeros(view.T)
    return per_run.mean(axis=0), std


def write_comparison(output_dir: str | os.PathLike[str], results: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """Writes ``comparison.csv`` and ``comparison.png`` for several methods run on the same
    scenario and seeds: the average accuracy on the tasks seen so far after each update, one line
    per method, shaded by the seeds' standard deviation. ``results`` maps a label to a result."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = [["method", "after_update", "task", "seen_task_accuracy_mean", "seen_task_accuracy_std",
                              "final_average_accuracy"]]
    curves = {}
    for label, result in results.items():
        mean, std = seen_task_average(result)
        curves[label] = (mean, std, _View(result))
        for i in range(len(mean)):
            rows.append([label, i, curves[label][2].task_labels[i], _cell(mean[i], 4), _cell(std[i], 4),
                         _cell(mean[-1], 4)])
    paths = {"comparison_csv": out / "comparison.csv", "comparison_png": out / "comparison.png"}
    _write_text(paths["comparison_csv"], _csv_text(rows))
    _save_figure(_plot_comparison(curves), paths["comparison_png"])
    return paths


def _plot_comparison(curves: Mapping[str, tuple[np.ndarray, np.ndarray, _View]]) -> Any:
    import matplotlib

    first = next(iter(curves.values()))[2]
    T = first.T
    fig = _new_figure((min(max(7.0, 0.45 * T + 5.0), 16.0), 5.0))
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"]
    shown = []
    x = np.arange(T)
    for k, (label, (mean, std, view)) in enumerate(curves.items()):
        color = colors(k % 10)
        ax.plot(x, 100 * mean, marker="o", linewidth=2.2, color=color,
                label=f"{label}: {100 * mean[-1]:.1f}%" + (f" ± {100 * std[-1]:.1f}" if view.multi else ""))
        if view.multi:
            ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.18, linewidth=0)
        shown.append(100 * (mean - std))
    step = _tick_step(T)
    ticks = list(range(0, T, step))
    ax.set_xticks(ticks, [first.task_labels[t] for t in ticks], rotation=45 if T > 8 else 0)
    ax.set_xlim(-0.3, T - 0.7)
    ax.set_ylim(*_accuracy_limits(np.concatenate(shown)))
    ax.set_xlabel("After training on task")
    ax.set_ylabel("Average accuracy on the tasks seen so far (%)")
    ax.grid(True, alpha=0.3)
    note = f"{first.seeds_note()} (shaded); " if first.multi else ""
    ax.set_title(f"Same scenario and seeds for every method; {note}legend: after the last update", fontsize=9)
    parts = [str(first.config.get(k)) for k in ("dataset", "scenario") if first.config.get(k)]
    fig.suptitle("Method comparison" + (": " + " · ".join(parts) if parts else ""), fontweight="bold")
    ax.legend(loc="lower left", fontsize=9, frameon=True)
    return fig


def format_comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: per method, the average accuracy on the seen tasks after each update."""
    labels = list(results)
    first = _View(results[labels[0]])
    header = "| method | " + " | ".join(f"after {t}" for t in first.task_labels) + " |"
    lines = [header, "|---" * (first.T + 1) + "|"]
    for label in labels:
        mean, std = seen_task_average(results[label])
        multi = is_multi_seed(results[label])
        cells = [f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if multi else "") for m, s in zip(mean, std, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- table


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text summary for the terminal: accuracy matrix in %, metrics, train time.

    Multi-seed results show ``mean ± std`` everywhere.
    """
    view = _View(result)
    T = view.T
    cells = []
    for i in range(T):
        row = []
        for j in range(T):
            v = 100.0 * view.R[i, j]
            if not math.isfinite(v):
                row.append("-")
            elif view.R_std is not None and math.isfinite(view.R_std[i, j]):
                row.append(f"{v:.2f}±{100.0 * view.R_std[i, j]:.2f}")
            else:
                row.append(f"{v:.2f}")
        cells.append(row)
    row_labels = [f"after {view.task_labels[i]}" for i in range(T)]
    w0 = max(len(s) for s in row_labels)
    w = max(max(len(c) for r in cells for c in r), max(len(t) for t in view.task_labels))

    lines = [view.title() + (f"  ({view.seeds_note()})" if view.multi else "")]
    lines.append("Accuracy (%) on each task (columns) after each update (rows):")
    lines.append(" " * w0 + "  " + "  ".join(t.rjust(w) for t in view.task_labels))
    for label, row in zip(row_labels, cells, strict=True):
        lines.append(label.ljust(w0) + "  " + "  ".join(c.rjust(w) for c in row))
    lines.append("")
    lw = max(len(lbl) for lbl, _ in _METRIC_LABELS.values())
    for k in METRIC_KEYS:
        label, unit = _METRIC_LABELS[k]
        s = view.metrics_std[k] if view.metrics_std is not None else None
        v = _fmt_metric(view.metrics[k], s)
        lines.append(f"{label.ljust(lw)} : {v}{' ' + unit if v != 'n/a' else ''}")
    lines.append(f"{'Train time'.ljust(lw)} : {_fmt_seconds(view.train_total, view.train_total_std)}")
    if view.config.get("scenario") == "class-incremental" and view.metrics.get("forward_transfer") is not None:
        lines.append(CLASS_INCREMENTAL_FWT_NOTE)
    return "\n".join(lines)


CLASS_INCREMENTAL_FWT_NOTE = (
    "Forward transfer is negative by construction in class-incremental runs: before training on\n"
    "task j the model was trained only on earlier classes and never predicts task j's, so R[j-1][j]\n"
    "is ~0, while b[j], the untrained model's accuracy on task j, is near chance: FWT ~ -mean b[j]."
)
