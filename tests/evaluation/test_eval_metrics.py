"""Continual-learning metrics on hand-made accuracy matrices (answers worked out by hand)."""

import math

import numpy as np
import pytest

from retain.evaluation.metrics import (
    METRIC_KEYS,
    aggregate_runs,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    summarize,
)

# R[i][j] = accuracy on task j after update i
R3 = [
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
]
B3 = [0.1, 0.2, 0.25]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R3) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_backward_transfer_3x3():
    # ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2 = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert backward_transfer(R3) == pytest.approx(-0.25)


def test_forward_transfer_3x3_uses_superdiagonal_and_b():
    # ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.1 - 0.2) + (0.3 - 0.25)) / 2
    assert forward_transfer(R3, B3) == pytest.approx(-0.025)
    # b[0] is never used
    assert forward_transfer(R3, [0.99, 0.2, 0.25]) == pytest.approx(-0.025)


def test_forgetting_3x3():
    # f0 = max(0.9, 0.6) - 0.5 = 0.4 ; f1 = max(0.8) - 0.7 = 0.1
    assert average_forgetting(R3) == pytest.approx(0.25)


def test_forgetting_max_not_on_diagonal_differs_from_bwt():
    R = [
        [0.5, 0.0, 0.0, 0.0],
        [0.8, 0.6, 0.0, 0.0],  # task 0 improved after learning task 1
        [0.7, 0.9, 0.7, 0.0],  # task 1 improved after learning task 2
        [0.4, 0.5, 0.6, 0.9],
    ]
    # f0 = 0.8 - 0.4, f1 = 0.9 - 0.5, f2 = 0.7 - 0.6
    assert average_forgetting(R) == pytest.approx((0.4 + 0.4 + 0.1) / 3)
    # BWT only compares with the diagonal: (-0.1 - 0.1 - 0.1) / 3
    assert backward_transfer(R) == pytest.approx(-0.1)


def test_forgetting_ignores_accuracy_before_the_task_was_learned():
    R = [
        [0.9, 0.95, 0.0],  # zero-shot 0.95 on task 1 (domain-incremental) must not count
        [0.8, 0.6, 0.0],
        [0.7, 0.5, 0.9],
    ]
    # f0 = 0.9 - 0.7 = 0.2 ; f1 = max(R[1][1]) - 0.5 = 0.1 (not 0.95 - 0.5)
    assert average_forgetting(R) == pytest.approx(0.15)


def test_forgetting_is_not_clipped():
    R = [[0.5, 0.0], [0.7, 0.9]]
    assert average_forgetting(R) == pytest.approx(-0.2)
    assert backward_transfer(R) == pytest.approx(0.2)


def test_single_task():
    R = [[0.7]]
    assert average_accuracy(R) == pytest.approx(0.7)
    assert backward_transfer(R) == 0.0
    assert forward_transfer(R, [0.1]) == 0.0
    assert average_forgetting(R) == 0.0


def test_numpy_and_list_inputs_agree():
    A = np.array(R3)
    for fn in (average_accuracy, backward_transfer, average_forgetting):
        assert fn(A) == pytest.approx(fn(R3))
        assert isinstance(fn(A), float)
    assert forward_transfer(A, np.array(B3)) == pytest.approx(forward_transfer(R3, B3))


def test_summarize():
    s = summarize(R3, B3)
    assert list(s) == list(METRIC_KEYS)
    assert s["average_accuracy"] == pytest.approx(2.15 / 3)
    assert s["backward_transfer"] == pytest.approx(-0.25)
    assert s["forward_transfer"] == pytest.approx(-0.025)
    assert s["average_forgetting"] == pytest.approx(0.25)
    assert summarize(R3)["forward_transfer"] is None


def test_unevaluated_upper_triangle_is_allowed():
    R = [[0.9, None], [0.8, 0.7]]
    assert average_accuracy(R) == pytest.approx(0.75)
    assert backward_transfer(R) == pytest.approx(-0.1)
    assert math.isnan(forward_transfer(R, [0.0, 0.0]))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[90.0, 0.0], [80.0, 70.0]], r"fractions in \[0, 1\] \(got range \[0, 90\]; percentages\?\)"),
        ([[0.5, 0.5]], r"must be square \(T, T\) with T >= 1, got shape \(1, 2\)"),
        ([], r"must be square \(T, T\) with T >= 1, got shape \(0,\)"),
        ([[-0.1]], r"fractions in \[0, 1\] \(got range \[-0.1, -0.1\]"),
    ],
)
def test_invalid_matrices_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        average_accuracy(bad)


def test_forward_transfer_checks_b_length():
    with pytest.raises(ValueError, match=r"b must have one entry per task \(3\), got 2"):
        forward_transfer(R3, [0.1, 0.2])


def test_aggregate_runs_mean_and_sample_std():
    r1 = {"accuracy_matrix": [[0.5, 0.0], [0.4, 0.6]], **summarize([[0.5, 0.0], [0.4, 0.6]], [0.0, 0.1])}
    r2 = {"accuracy_matrix": [[0.7, 0.2], [0.6, 0.8]], **summarize([[0.7, 0.2], [0.6, 0.8]], [0.0, 0.1])}
    r1.update(train_seconds=[1.0, 2.0], seed=0, config={"method": "er"})
    r2.update(train_seconds=[3.0, 4.0], seed=1, config={"method": "er"})
    agg = aggregate_runs([r1, r2])
    assert agg["n_runs"] == 2
    mean, std = agg["mean"], agg["std"]
    # ACC: 0.5 and 0.7 -> mean 0.6, sample std sqrt((0.1^2 + 0.1^2) / 1)
    assert mean["average_accuracy"] == pytest.approx(0.6)
    assert std["average_accuracy"] == pytest.approx(math.sqrt(0.02))
    # FWT: (0.0 - 0.1) and (0.2 - 0.1)
    assert mean["forward_transfer"] == pytest.approx(0.0)
    assert std["forward_transfer"] == pytest.approx(math.sqrt(0.02))
    np.testing.assert_allclose(mean["accuracy_matrix"], [[0.6, 0.1], [0.5, 0.7]])
    s = math.sqrt(0.02)
    np.testing.assert_allclose(std["accuracy_matrix"], [[s, s], [s, s]])
    assert mean["train_seconds"] == pytest.approx([2.0, 3.0])
    assert mean["train_seconds_total"] == pytest.approx(5.0)  # 3 and 7
    assert std["train_seconds_total"] == pytest.approx(math.sqrt(8.0))
    assert "seed" not in mean and "config" not in mean


def test_aggregate_single_run_has_zero_std():
    r = {"accuracy_matrix": R3, **summarize(R3)}
    agg = aggregate_runs([r])
    assert agg["mean"]["average_accuracy"] == pytest.approx(2.15 / 3)
    assert agg["std"]["average_accuracy"] == 0.0
    assert agg["std"]["accuracy_matrix"] == [[0.0] * 3] * 3
    assert agg["mean"]["forward_transfer"] is None and agg["std"]["forward_transfer"] is None


def test_aggregate_runs_errors():
    with pytest.raises(ValueError, match="aggregate_runs needs at least one run"):
        aggregate_runs([])
    with pytest.raises(ValueError, match="accuracy_matrix"):
        aggregate_runs([{"accuracy_matrix": [[0.5]]}, {"accuracy_matrix": [[0.5, 0.1], [0.2, 0.3]]}])
