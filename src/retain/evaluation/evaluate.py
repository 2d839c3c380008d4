"""Accuracy of a model on tensors and on the test split of every task.

The model is a ``ContinualModel`` (called as ``model(x, task_id)``) or any ``torch.nn.Module``
returning logits of shape ``(B, C)`` or an object with ``.logits`` (called with
``retain.nested.call_model``: ``m(x)``, ``m(*x)`` or ``m(**x)``); inputs may be nested.
Evaluation runs in eval mode under ``torch.inference_mode()`` and puts
every module back in the train/eval mode it was in before, so it is safe to call in the
middle of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from retain.models.adapter import forward_logits

__all__ = ["EvalTask", "accuracy", "accuracy_on_dataset", "accuracy_row"]


class EvalTask(Protocol):
    """What :func:`accuracy_row` needs from a task: its id, classes and test split."""

    task_id: str
    classes: list[int]
    test: TensorDataset


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def accuracy(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 1024,
    task_id: Any = None,
    classes: Sequence[int] | None = None,
) -> float:
    """Fraction of ``inputs`` whose arg-max logit equals ``targets``.

    Batches of ``batch_size`` are moved to the model's device, passed through
    ``transform`` (a callable on batched tensors, e.g. uint8 -> normalised float) and then
    through ``model(x, task_id)``. When ``classes`` is given (task-incremental
    evaluation), logits of all other classes are set to ``-inf`` before the arg-max, so
    the prediction is restricted to the task's own classes. Correct predictions are
    counted on the device and synchronised once at the end.

    Raises ``ValueError`` for an empty input, mismatched lengths or an empty ``classes``.
    """
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"inputs ({n}) and targets ({targets.shape[0]}) differ in length")
    if n == 0:
        raise ValueError("cannot compute accuracy on an empty input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if classes is not None and len(classes) == 0:
        raise ValueError("classes must name at least one class")

    device = _device_of(model)
    rows = (slice(i, i + batch_size) for i in range(0, n, batch_size))
    batches = ((inputs[r].to(device, non_blocking=True), targets[r].to(device, non_blocking=True)) for r in rows)
    correct, _ = _count_correct(model, batches, transform, task_id, classes)
    return correct / n


def _count_correct(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    transform: Callable[[Any], Any] | None,
    task_id: Any,
    classes: Sequence[int] | None,
) -> tuple[int, int]:
    """(correct predictions, items) over ``batches`` on the model's device, counted on the device
    and synchronised once; the model is scored in eval mode and each module's mode restored."""
    device = _device_of(model)
    modes = [(m, m.training) for m in model.modules()]
    keep: Tensor | None = None
    correct = torch.zeros((), dtype=torch.int64, device=device)
    items = 0
    try:
        model.eval()
        with torch.inference_mode():
            for x, y in batches:
                y = y.reshape(-1)
                if transform is not None:
                    x = transform(x)
                logits = forward_logits(model, x, task_id)
                if classes is not None:
                    if keep is None:
                        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
                        keep[torch.as_tensor(list(classes), dtype=torch.long, device=device)] = True
                    logits = logits.masked_fill(~keep, float("-inf"))
                correct += (logits.argmax(dim=-1) == y).sum()
                items += int(y.shape[0])
    finally:
        for m, was_training in modes:
            m.training = was_training
    return int(correct.item()), items


def accuracy_on_dataset(
    model: nn.Module,
    dataset: Dataset | DataLoader,
    *,
    collate_fn: Callable | None = None,
    transform: Callable[[Any], Any] | None = None,
    batch_size: int = 1024,
    task_id: Any = None,
    classes: Sequence[int] | None = None,
    num_workers: int = 0,
) -> tuple[float, int]:
    """``(accuracy, items)`` of ``model`` on a dataset read batch by batch (streamed: one batch in
    memory at a time, never the whole dataset), as :func:`accuracy` scores tensors.

    ``dataset`` is any map-style or iterable dataset (items as ``retain.batching.split_batch``
    accepts, with ``collate_fn``) or a ``DataLoader`` (its dataset and collate function). Raises
    ``ValueError`` for an empty dataset or an empty ``classes``."""
    from retain.batching import LoaderOptions, iter_batches, unwrap_loader

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if classes is not None and len(classes) == 0:
        raise ValueError("classes must name at least one class")
    dataset, collate_fn, loading = unwrap_loader(dataset, collate_fn, LoaderOptions(num_workers=num_workers))
    device = _device_of(model)
    batches = iter_batches(dataset, batch_size, collate_fn, device, loading, where="test dataset")
    correct, items = _count_correct(model, batches, transform, task_id, classes)
    if items == 0:
        raise ValueError("cannot compute accuracy on an empty dataset")
    return correct / items, items


def accuracy_row(
    model: nn.Module,
    tasks: Sequence[EvalTask],
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 1024,
    task_incremental: bool = False,
) -> list[float]:
    """Accuracy on the test split of every task, in order: one row of the accuracy matrix.

    ``task.test.tensors`` must start with ``(inputs, targets)``. With
    ``task_incremental=True`` the model gets the task identity (``task_id=task.task_id``)
    and predictions are restricted to ``task.classes``; otherwise (class- and
    domain-incremental) the model gets ``task_id=None`` and must predict among all
    classes, since the task is not known at test time in those scenarios. A task whose head the
    model does not have yet (not trained on) is scored on a copy with a fresh head, the head its
    update would start from (drawn without touching the global random state).
    """
    row = []
    for task in tasks:
        inputs, targets = task.test.tensors[:2]
        scored = model
        heads = getattr(model, "heads", None)
        if task_incremental and heads is not None and task.task_id not in heads:
            scored = _with_fresh_head(model, task.task_id)
        row.append(
            accuracy(
                scored,
                inputs,
                targets,
                transform=transform,
                batch_size=batch_size,
                task_id=task.task_id if task_incremental else None,
                classes=task.classes if task_incremental else None,
            )
        )
    return row


def _with_fresh_head(model: nn.Module, task_id: str) -> nn.Module:
    """A copy of ``model`` with a newly initialised head for ``task_id`` (global RNG untouched)."""
    import copy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = copy.deepcopy(model)
        fresh.add_task_params(task_id)  # type: ignore[operator]
    return fresh
