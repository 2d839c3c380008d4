"""Scenarios: class splits, validation hold-out, fixed per-task permutations and rotations."""

from __future__ import annotations

import pytest
import torch

from retain.data.datasets import TensorSplits, load_dataset
from retain.data.scenarios import (
    SCENARIO_NAMES,
    class_incremental,
    make_scenario,
    permuted,
    rotate_images,
    rotated,
    task_incremental_logits,
)


@pytest.fixture(scope="module")
def digits() -> TensorSplits:
    return load_dataset("digits")


def _id_splits(num_classes: int = 10, n_train: int = 400, n_test: int = 100) -> TensorSplits:
    """Synthetic splits where every pixel of an item holds the item's id (train 0.., test 10000..)."""
    def part(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(offset, offset + n, dtype=torch.int32)
        return ids.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone(), torch.arange(n) % num_classes

    train_x, train_y = part(n_train, 0)
    test_x, test_y = part(n_test, 10000)
    return TensorSplits("ids", train_x, train_y, test_x, test_y, num_classes, (1, 4, 4), 1.0, (0.0,), (1.0,))


def _ids(dataset) -> set[int]:
    return set(dataset.tensors[0][:, 0, 0, 0].tolist())


def test_class_incremental_default_five_tasks(digits: TensorSplits) -> None:
    tasks = class_incremental(digits)
    assert [t.classes for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [t.task_id for t in tasks] == [f"task{i}" for i in range(5)]
    for task in tasks:
        for part in (task.train, task.test):
            assert set(part.tensors[1].tolist()) == set(task.classes)
            assert part.tensors[0].dtype == torch.uint8
        assert task.val is None and not task.task_incremental
    assert sum(len(t.train) for t in tasks) == len(digits.train_targets)
    assert sum(len(t.test) for t in tasks) == len(digits.test_targets)


def test_class_incremental_task_sizes_and_errors(digits: TensorSplits) -> None:
    assert [t.classes for t in class_incremental(digits, classes_per_task=5)] == [[0, 1, 2, 3, 4],
                                                                                  [5, 6, 7, 8, 9]]
    assert len(class_incremental(digits, num_tasks=10)) == 10
    with pytest.raises(ValueError, match="not both"):
        class_incremental(digits, num_tasks=5, classes_per_task=2)
    with pytest.raises(ValueError, match="evenly into 3 tasks"):
        class_incremental(digits, num_tasks=3)
    with pytest.raises(ValueError, match="tasks of 4 classes"):
        class_incremental(digits, classes_per_task=4)
    for bad, message in (
        ({"num_tasks": 0}, "num_tasks must be a positive integer, got 0"),
        ({"classes_per_task": -2}, "classes_per_task must be a positive integer, got -2"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\), got -0.1"),
    ):
        with pytest.raises(ValueError, match=message):
            class_incremental(digits, **bad)


def test_shuffled_class_order_comes_from_seed(digits: TensorSplits) -> None:
    a = [t.classes for t in class_incremental(digits, shuffle_classes=True, class_order_seed=1)]
    b = [t.classes for t in class_incremental(digits, shuffle_classes=True, class_order_seed=1)]
    c = [t.classes for t in class_incremental(digits, shuffle_classes=True, class_order_seed=2)]
    assert a == b and a != c
    assert sorted(c for classes in a for c in classes) == list(range(10))
    assert a != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    tasks = class_incremental(digits, shuffle_classes=True, class_order_seed=1)
    for task in tasks:
        assert set(task.train.tensors[1].tolist()) == set(task.classes)


def test_validation_is_held_out_of_train_only() -> None:
    splits = _id_splits()
    tasks = class_incremental(splits, num_tasks=5, val_fraction=0.25, seed=3)
    all_val: set[int] = set()
    for task in tasks:
        train, val, test = _ids(task.train), _ids(task.val), _ids(task.test)
        assert not train & val
        assert all(i < 10000 for i in val)  # never from test
        assert min(test) >= 10000
        in_classes = {i for i in range(400) if i % 10 in task.classes}
        assert train | val == in_classes
        for c in task.classes:  # stratified: 25 % of the 40 items of every class
            assert sum(1 for i in val if i % 10 == c) == 10
        assert set(task.val.tensors[1].tolist()) == set(task.classes)
        all_val |= val
    again = class_incremental(splits, num_tasks=5, val_fraction=0.25, seed=3)
    assert set().union(*(_ids(t.val) for t in again)) == all_val
    other = class_incremental(splits, num_tasks=5, val_fraction=0.25, seed=4)
    assert set().union(*(_ids(t.val) for t in other)) != all_val


def test_permutations_fixed_per_task_and_distinct(digits: TensorSplits) -> None:
    tasks = permuted(digits, num_tasks=3, seed=5)
    again = permuted(digits, num_tasks=3, seed=5)
    other = permuted(digits, num_tasks=3, seed=6)
    perms = [t.info["permutation"] for t in tasks]
    for task, same, diff in zip(tasks, again, other, strict=True):
        assert torch.equal(task.train.tensors[0], same.train.tensors[0])
        assert not torch.equal(task.train.tensors[0], diff.train.tensors[0])
        assert task.classes == list(range(10))
        assert task.train.tensors[0].dtype == torch.uint8
        assert torch.equal(task.train.tensors[1], digits.train_targets)
        assert len(task.test) == len(digits.test_targets)
    assert not torch.equal(perms[0], torch.arange(64))  # the first task is permuted too
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    for task, perm in zip(tasks, perms, strict=True):
        expected = digits.test_inputs.reshape(-1, 1, 64)[:, :, perm].reshape(-1, 1, 8, 8)
        assert torch.equal(task.test.tensors[0], expected)
        assert sorted(perm.tolist()) == list(range(64))


def test_permuted_with_validation(digits: TensorSplits) -> None:
    tasks = permuted(digits, num_tasks=2, val_fraction=0.1)
    for task in tasks:
        assert len(task.train) + len(task.val) == len(digits.train_targets)
        assert abs(len(task.val) - 0.1 * len(digits.train_targets)) <= 10
        assert len(task.test) == len(digits.test_targets)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer, got 0"):
        permuted(digits, num_tasks=0)


def test_rotate_90_matches_rot90(digits: TensorSplits) -> None:
    images = digits.test_inputs[:50]
    expected = torch.rot90(images, 1, dims=(-2, -1))
    out = rotate_images(images, 90.0)
    assert out.dtype == torch.uint8
    assert torch.equal(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])  # interior: exact
    assert (out.int() - expected.int()).abs().float().mean() < 0.5  # borders: up to interpolation
    tasks = rotated(digits, num_tasks=2, min_angle=90.0, max_angle=90.0)
    assert [t.info["angle"] for t in tasks] == [90.0, 90.0]
    rotated_test = tasks[0].test.tensors[0]
    assert torch.equal(rotated_test[..., 1:-1, 1:-1],
                       torch.rot90(digits.test_inputs, 1, dims=(-2, -1))[..., 1:-1, 1:-1])


def test_rotation_keeps_float_and_non_square_shapes() -> None:
    x = torch.rand(3, 2, 6, 10)
    out = rotate_images(x, 180.0, chunk_size=2)
    torch.testing.assert_close(out, torch.rot90(x, 2, dims=(-2, -1)))
    torch.testing.assert_close(rotate_images(x, 0.0), x)
    assert rotate_images(x.double(), 30.0).dtype == torch.float64


def test_rotated_angles_from_seed(digits: TensorSplits) -> None:
    tasks = rotated(digits, num_tasks=4, seed=1, min_angle=10.0, max_angle=50.0)
    angles = [t.info["angle"] for t in tasks]
    assert all(10.0 <= a < 50.0 for a in angles) and len(set(angles)) == 4
    assert angles == [t.info["angle"] for t in rotated(digits, num_tasks=4, seed=1, min_angle=10.0,
                                                      max_angle=50.0)]
    assert angles != [t.info["angle"] for t in rotated(digits, num_tasks=4, seed=2, min_angle=10.0,
                                                      max_angle=50.0)]
    for task in tasks:
        assert task.classes == list(range(10)) and task.train.tensors[0].dtype == torch.uint8
        assert torch.equal(task.test.tensors[1], digits.test_targets)
    with pytest.raises(ValueError, match="min_angle"):
        rotated(digits, num_tasks=2, min_angle=30.0, max_angle=10.0)


def test_make_scenario(digits: TensorSplits) -> None:
    ci = make_scenario("class-incremental", digits, num_tasks=2)
    ti = make_scenario("task-incremental", digits, num_tasks=2)
    assert [t.classes for t in ci] == [t.classes for t in ti]
    assert not any(t.task_incremental for t in ci) and all(t.task_incremental for t in ti)
    assert len(make_scenario("permuted", digits, num_tasks=2)) == 2
    assert len(make_scenario("rotated", digits, num_tasks=2, seed=3)) == 2
    with pytest.raises(ValueError, match="blurry") as info:
        make_scenario("blurry", digits)
    for name in SCENARIO_NAMES:
        assert name in str(info.value)
    assert "classes=[0, 1, 2, 3, 4]" in repr(ci[0])


def test_task_incremental_logits() -> None:
    logits = torch.arange(12.0).view(2, 6)
    masked = task_incremental_logits(logits, [2, 3])
    assert torch.equal(masked[:, 2:4], logits[:, 2:4])
    assert torch.isinf(masked[:, [0, 1, 4, 5]]).all() and (masked[:, [0, 1, 4, 5]] < 0).all()
    assert masked.argmax(dim=1).tolist() == [3, 3]
    assert torch.equal(task_incremental_logits(logits, torch.tensor([5])).argmax(1), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match=r"classes must be a non-empty subset of 0..5, got \[6\]"):
        task_incremental_logits(logits, [6])
    with pytest.raises(ValueError, match=r"classes must be a non-empty subset of 0..5, got \[\]"):
        task_incremental_logits(logits, [])
