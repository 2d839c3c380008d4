"""Continual-learning scenarios: split a :class:`TensorSplits` into a sequence of :class:`Task`.

* ``class-incremental``: each task holds a disjoint group of classes; at test time the model must tell
  all classes seen so far apart. Targets keep their original (global) labels.
* ``task-incremental``: the same tasks, but the task identity is known at evaluation, so logits outside
  the task's classes may be masked (:func:`task_incremental_logits`).
* ``permuted`` / ``rotated``: domain-incremental; every task has all classes, with a fixed pixel
  permutation or rotation per task applied to its train and test inputs.

Validation data, when asked for, is always held out of the training part (stratified per class, from
``seed``), never taken from the test part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from retain.data.datasets import TensorSplits

__all__ = [
    "SCENARIO_NAMES",
    "Task",
    "class_incremental",
    "make_scenario",
    "permuted",
    "rotate_images",
    "rotated",
    "task_incremental",
    "task_incremental_logits",
]

SCENARIO_NAMES: tuple[str, ...] = ("class-incremental", "task-incremental", "permuted", "rotated")


@dataclass
class Task:
    """One task of a scenario: its classes and its train / (optional) validation / test data.

    ``task_incremental`` is true when evaluation may use the task identity (mask logits to ``classes``
    with :func:`task_incremental_logits`). ``info`` holds what defines the task (e.g. its angle).
    """

    task_id: str
    classes: list[int]
    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    task_incremental: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        val = None if self.val is None else len(self.val)
        info = {k: _short(v) for k, v in self.info.items()}
        return (f"Task({self.task_id!r}, classes={_short(self.classes)}, train={len(self.train)}, val={val}, "
                f"test={len(self.test)}, task_incremental={self.task_incremental}, info={info})")


def _short(value: Any) -> Any:
    """A compact stand-in for long lists and tensors in reprs."""
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)}>"
    if isinstance(value, list) and len(value) > 12:
        return f"[{', '.join(map(str, value[:10]))}, ... ({len(value)} items)]"
    return value


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _val_mask(targets: Tensor, num_classes: int, val_fraction: float, seed: int) -> Tensor:
    """Boolean mask over the training set marking a stratified ``val_fraction`` of every class.

    Each class is drawn on its own (classes in label order, one generator from ``seed``), so a sample's
    role does not depend on how classes are grouped into tasks.
    """
    mask = torch.zeros(len(targets), dtype=torch.bool)
    if val_fraction == 0.0:
        return mask
    g = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        pos = (targets == c).nonzero().squeeze(1)
        k = min(round(val_fraction * len(pos)), max(len(pos) - 1, 0))
        mask[pos[torch.randperm(len(pos), generator=g)[:k]]] = True
    return mask


def _subset(inputs: Tensor, targets: Tensor, mask: Tensor) -> TensorDataset:
    idx = mask.nonzero().squeeze(1)
    return TensorDataset(inputs[idx], targets[idx])


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def class_incremental(
    splits: TensorSplits,
    num_tasks: int | None = None,
    classes_per_task: int | None = None,
    shuffle_classes: bool = False,
    class_order_seed: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> list[Task]:
    """Split the classes into equal, disjoint groups, one per task (default 5 tasks).

    Give at most one of ``num_tasks`` / ``classes_per_task``; it must divide ``num_classes``. Classes go
    in label order (0,1 | 2,3 | ...) or, with ``shuffle_classes``, in an order drawn from
    ``class_order_seed``. Targets keep their original labels.
    """
    K = splits.num_classes
    if num_tasks is not None and classes_per_task is not None:
        raise ValueError("give num_tasks or classes_per_task, not both")
    if classes_per_task is not None:
        _check_count("classes_per_task", classes_per_task)
        if K % classes_per_task:
            raise ValueError(f"{K} classes cannot be split into tasks of {classes_per_task} classes")
        num_tasks = K // classes_per_task
    else:
        num_tasks = 5 if num_tasks is None else num_tasks
        _check_count("num_tasks", num_tasks)
        if K % num_tasks:
            raise ValueError(f"{K} classes cannot be split evenly into {num_tasks} tasks")
        classes_per_task = K // num_tasks
    _check_fraction(val_fraction)
    if shuffle_classes:
        order = torch.randperm(K, generator=torch.Generator().manual_seed(class_order_seed)).tolist()
    else:
        order = list(range(K))
    is_val = _val_mask(splits.train_targets, K, val_fraction, seed)
    tasks = []
    for t in range(num_tasks):
        classes = order[t * classes_per_task : (t + 1) * classes_per_task]
        cls = torch.tensor(classes)
        in_train = torch.isin(splits.train_targets, cls)
        in_test = torch.isin(splits.test_targets, cls)
        tasks.append(Task(
            task_id=f"task{t}",
            classes=classes,
            train=_subset(splits.train_inputs, splits.train_targets, in_train & ~is_val),
            val=(_subset(splits.train_inputs, splits.train_targets, in_train & is_val)
                 if val_fraction else None),
            test=_subset(splits.test_inputs, splits.test_targets, in_test),
            info={"class_order": list(order)},
        ))
    return tasks


def task_incremental(splits: TensorSplits, **kwargs: Any) -> list[Task]:
    """The class-incremental tasks, flagged so that evaluation may use the task's classes."""
    tasks = class_incremental(splits, **kwargs)
    for task in tasks:
        task.task_incremental = True
    return tasks


def task_incremental_logits(logits: Tensor, classes: Sequence[int] | Tensor) -> Tensor:
    """Return ``logits`` (..., num_classes) with every class outside ``classes`` set to -inf."""
    index = torch.as_tensor(classes, dtype=torch.long, device=logits.device).reshape(-1)
    n = logits.shape[-1]
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n:
        raise ValueError(f"classes must be a non-empty subset of 0..{n - 1}, got {classes}")
    keep = torch.zeros(n, dtype=torch.bool, device=logits.device)
    keep[index] = True
    return logits.masked_fill(~keep, float("-inf"))


def _domain_tasks(
    splits: TensorSplits,
    num_tasks: int,
    val_fraction: float,
    seed: int,
    transforms: Sequence[Any],
    apply: Callable[[Tensor, Any], Tensor],
    infos: Sequence[dict[str, Any]],
) -> list[Task]:
    """All classes in every task; task ``t`` applies ``apply(inputs, transforms[t])`` to its data."""
    is_val = _val_mask(splits.train_targets, splits.num_classes, val_fraction, seed)
    classes = list(range(splits.num_classes))
    train_idx = (~is_val).nonzero().squeeze(1)
    val_idx = is_val.nonzero().squeeze(1)
    tasks = []
    for t in range(num_tasks):
        def part(inputs: Tensor, targets: Tensor, idx: Tensor | None, t: int = t) -> TensorDataset:
            if idx is None:
                return TensorDataset(apply(inputs, transforms[t]), targets)
            return TensorDataset(apply(inputs[idx], transforms[t]), targets[idx])

        tasks.append(Task(
            task_id=f"task{t}",
            classes=classes,
            train=part(splits.train_inputs, splits.train_targets, train_idx),
            val=part(splits.train_inputs, splits.train_targets, val_idx) if val_fraction else None,
            test=part(splits.test_inputs, splits.test_targets, None),
            info=infos[t],
        ))
    return tasks


def _permute_pixels(images: Tensor, perm: Tensor) -> Tensor:
    n, c, h, w = images.shape
    return images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def permuted(splits: TensorSplits, num_tasks: int, seed: int = 0, val_fraction: float = 0.0) -> list[Task]:
    """Domain-incremental tasks, each with its own fixed random permutation of the pixel positions.

    Every task, the first included, gets a permutation drawn from ``seed``; the same permutation of the
    H*W positions is applied to every channel. Inputs are materialised in the source dtype.
    """
    _check_count("num_tasks", num_tasks)
    _check_fraction(val_fraction)
    _, h, w = splits.input_shape
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(h * w, generator=g) for _ in range(num_tasks)]
    infos = [{"permutation": p} for p in perms]
    return _domain_tasks(splits, num_tasks, val_fraction, seed, perms, _permute_pixels, infos)


def rotate_images(images: Tensor, angle: float, chunk_size: int = 8192) -> Tensor:
    """Rotate (N, C, H, W) images counter-clockwise by ``angle`` degrees about their centre.

    Bilinear interpolation (``affine_grid`` + ``grid_sample``) on float with zero fill outside; integer
    inputs are rounded back to their dtype. All images share one sampling grid, so they are fed as the
    channels of a single grid_sample item, ``chunk_size`` at a time to bound memory. ``angle=90``
    matches ``torch.rot90(images, 1, dims=(-2, -1))`` for square images.
    """
    n, c, h, w = images.shape
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    # affine_grid maps output to input coordinates in [-1, 1] units; scale so the rotation is rigid
    # in pixel units even for non-square images.
    integer = not images.dtype.is_floating_point
    dtype = torch.float32 if integer else images.dtype
    theta = torch.tensor([[[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]]], dtype=dtype,
                         device=images.device)
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    flat = images.reshape(1, n * c, h, w)
    out = torch.empty_like(flat)
    for start in range(0, n * c, chunk_size):
        x = flat[:, start : start + chunk_size]
        y = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if integer:
            info = torch.iinfo(images.dtype)
            y = y.round_().clamp_(info.min, info.max)
        out[:, start : start + chunk_size] = y.to(images.dtype)
    return out.reshape(n, c, h, w)


def rotated(
    splits: TensorSplits,
    num_tasks: int,
    seed: int = 0,
    val_fraction: float = 0.0,
    min_angle: float = 0.0,
    max_angle: float = 180.0,
) -> list[Task]:
    """Domain-incremental tasks, each rotating all images by its own angle, uniform in [min, max)."""
    _check_count("num_tasks", num_tasks)
    _check_fraction(val_fraction)
    if not min_angle <= max_angle:
        raise ValueError(f"need min_angle <= max_angle, got {min_angle} > {max_angle}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_tasks, generator=g, dtype=torch.float64)
    angles = [min_angle + (max_angle - min_angle) * float(v) for v in u]
    infos = [{"angle": a} for a in angles]
    return _domain_tasks(splits, num_tasks, val_fraction, seed, angles, rotate_images, infos)


def make_scenario(name: str, splits: TensorSplits, **kwargs: Any) -> list[Task]:
    """Build a scenario by name (one of :data:`SCENARIO_NAMES`); ``kwargs`` go to its builder."""
    builders = {
        "class-incremental": class_incremental,
        "task-incremental": task_incremental,
        "permuted": permuted,
        "rotated": rotated,
    }
    key = name.strip().lower().replace("_", "-")
    if key not in builders:
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIO_NAMES)}")
    return builders[key](splits, **kwargs)
