"""Continual-learning metrics computed from an accuracy matrix.

Every function takes an accuracy matrix ``R`` of shape ``(T, T)`` (numpy array or nested
lists), where ``R[i][j]`` is the accuracy on the test set of task ``j`` after update ``i``
(i.e. after training on task ``i``), as a fraction in ``[0, 1]``. Indices are 0-based, so
the final model is row ``T-1``. Entries that were not evaluated may be ``None``/``NaN``;
they only matter when a metric reads them (then the metric is ``NaN``).

Definitions follow Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual
Learning* (NeurIPS 2017), and, for forgetting, Chaudhry et al., *Riemannian Walk for
Incremental Learning* (ECCV 2018). All returned values are fractions (multiply by 100
for percentage points).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "ARRAY_KEYS",
    "METRIC_KEYS",
    "aggregate_runs",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "summarize",
]

#: Scalar metrics produced by :func:`summarize`, in display order.
METRIC_KEYS: tuple[str, ...] = (
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "average_forgetting",
)

#: Array-valued result fields that :func:`aggregate_runs` averages elementwise.
ARRAY_KEYS: tuple[str, ...] = ("accuracy_matrix", "train_seconds", "initial_accuracy")

# Numeric top-level fields that are identifiers, not measurements: never averaged.
_NOT_AGGREGATED = frozenset({"seed", "seeds", "n_runs"})

_TOL = 1e-6


def _as_matrix(R: ArrayLike) -> np.ndarray:
    """Return ``R`` as a float64 ``(T, T)`` array after checking shape and range."""
    M = np.array(R, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square (T, T) with T >= 1, got shape {M.shape}")
    finite = M[np.isfinite(M)]
    if finite.size and (finite.min() < -_TOL or finite.max() > 1.0 + _TOL):
        raise ValueError(
            "accuracy matrix entries must be fractions in [0, 1] "
            f"(got range [{finite.min():g}, {finite.max():g}]; percentages?)"
        )
    return M


def average_accuracy(R: ArrayLike) -> float:
    """Average accuracy of the final model over all tasks (GEM "ACC").

    ``ACC = 1/T * sum_{j=0}^{T-1} R[T-1][j]``
    """
    M = _as_matrix(R)
    return float(M[-1].mean())


def backward_transfer(R: ArrayLike) -> float:
    """Backward transfer (GEM "BWT"): how learning later tasks changed earlier ones.

    ``BWT = 1/(T-1) * sum_{j=0}^{T-2} (R[T-1][j] - R[j][j])``; ``0.0`` when ``T == 1``.
    Negative values mean forgetting.
    """
    M = _as_matrix(R)
    T = M.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(T - 1)
    return float(np.mean(M[T - 1, j] - M[j, j]))


def forward_transfer(R: ArrayLike, b: ArrayLike) -> float:
    """Forward transfer (GEM "FWT"): zero-shot accuracy on a task before training on it.

    ``FWT = 1/(T-1) * sum_{j=1}^{T-1} (R[j-1][j] - b[j])``; ``0.0`` when ``T == 1``.
    ``b[j]`` is the accuracy on task ``j`` of the model at initialisation (before any
    update); ``b`` has length ``T`` and ``b[0]`` is not used.
    """
    M = _as_matrix(R)
    T = M.shape[0]
    base = np.asarray(b, dtype=np.float64).reshape(-1)
    if base.shape[0] != T:
        raise ValueError(f"b must have one entry per task ({T}), got {base.shape[0]}")
    if T == 1:
        return 0.0
    j = np.arange(1, T)
    return float(np.mean(M[j - 1, j] - base[j]))


def average_forgetting(R: ArrayLike) -> float:
    """Average forgetting (Chaudhry et al. 2018): best past accuracy minus final accuracy.

    For each task ``j < T-1``::

        f_j = max_{l in {j, ..., T-2}} R[l][j] - R[T-1][j]

    and ``F = 1/(T-1) * sum_{j=0}^{T-2} f_j``; ``0.0`` when ``T == 1``. The maximum only
    runs over updates ``l >= j`` (the task has been learned), so zero-shot accuracy before
    task ``j`` was trained on never counts as knowledge that was lost (the original paper
    takes ``l`` from 0; the two agree whenever ``R[l][j] <= R[j][j]`` for ``l < j``, e.g.
    class-incremental learning). ``f_j`` is not clipped: it is negative when the final
    accuracy on task ``j`` is above every earlier one.
    """
    M = _as_matrix(R)
    T = M.shape[0]
    if T == 1:
        return 0.0
    f = [M[j : T - 1, j].max() - M[T - 1, j] for j in range(T - 1)]
    return float(np.mean(f))


def summarize(R: ArrayLike, b: ArrayLike | None = None) -> dict[str, float | None]:
    """All four metrics of ``R`` as a dict keyed by :data:`METRIC_KEYS`.

    ``forward_transfer`` is ``None`` when the initial accuracies ``b`` are not given.
    """
    M = _as_matrix(R)
    return {
        "average_accuracy": average_accuracy(M),
        "backward_transfer": backward_transfer(M),
        "forward_transfer": None if b is None else forward_transfer(M, b),
        "average_forgetting": average_forgetting(M),
    }


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool | np.bool_)


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over axis 0; std is the sample std (ddof=1) for n > 1, else 0."""
    mean = values.mean(axis=0)
    if values.shape[0] > 1:
        std = values.std(axis=0, ddof=1)
    else:
        std = np.zeros_like(mean)
    return mean, std


def _to_py(a: np.ndarray) -> Any:
    """numpy -> plain Python floats / nested lists, NaN -> None (JSON friendly)."""
    if a.ndim == 0:
        v = float(a)
        return None if math.isnan(v) else v
    return [_to_py(x) for x in a]


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std across runs (seeds) of every metric and, elementwise, of every array.

    Aggregated fields: the scalar metrics of :data:`METRIC_KEYS`, any other top-level
    field that is a number in every run (except ``seed``), and the arrays of
    :data:`ARRAY_KEYS` (``accuracy_matrix``, ``train_seconds``, ``initial_accuracy``),
    which must have the same shape in every run. When every run has ``train_seconds``,
    ``train_seconds_total`` (their per-run sum) is aggregated as well. A field that is
    missing from some run, or that is ``None`` in some run, is ``None`` in both ``mean``
    and ``std``; other fields (``config``, strings, ...) are ignored.

    The std is the sample standard deviation (``ddof=1``) when there are two or more
    runs, and ``0.0`` for a single run.

    Returns ``{"n_runs": int, "mean": {field: value}, "std": {field: value}}`` where
    values are floats or nested lists of floats (``NaN`` entries become ``None``).
    """
    if len(runs) == 0:
        raise ValueError("aggregate_runs needs at least one run")
    runs = [dict(r) for r in runs]
    if all(r.get("train_seconds") is not None for r in runs):
        for r in runs:
            r["train_seconds_total"] = float(np.sum(np.asarray(r["train_seconds"], dtype=np.float64)))

    keys: list[str] = list(METRIC_KEYS)
    for r in runs:
        for k, v in r.items():
            if k in keys or k in _NOT_AGGREGATED or k in ARRAY_KEYS:
                continue
            if _is_number(v):
                keys.append(k)
    keys += [k for k in ARRAY_KEYS if any(k in r for r in runs)]

    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for k in keys:
        vals = [r.get(k) for r in runs]
        if any(v is None for v in vals):
            if any(k in r for r in runs):
                mean[k] = std[k] = None
            continue
        try:
            stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vals])
        except ValueError as e:
            raise ValueError(f"field {k!r} does not have the same shape in every run") from e
        m, s = _mean_std(stacked)
        mean[k], std[k] = _to_py(m), _to_py(s)
    return {"n_runs": len(runs), "mean": mean, "std": std}
