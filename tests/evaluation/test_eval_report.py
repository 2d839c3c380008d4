"""Report files (results.json, CSVs, PNGs) and the terminal table."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from retain.evaluation.report import (
    build_multi_seed_result,
    build_result,
    format_table,
    is_multi_seed,
    write_report,
)

R3 = [
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
]
CONFIG = {"method": "der++", "dataset": "split-mnist", "scenario": "class-incremental", "lr": 0.1}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = {"results.json", "accuracy_matrix.csv", "metrics.csv", "accuracy_matrix.png", "task_accuracy.png"}


def _single(R=R3, seed=0, secs=(1.0, 2.0, 3.0)):
    return build_result(R, config=CONFIG, train_seconds=list(secs), initial_accuracy=[0.1, 0.2, 0.25], seed=seed)


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_build_result_fields():
    r = _single()
    assert r["config"] == CONFIG
    assert r["accuracy_matrix"] == R3
    assert r["average_accuracy"] == pytest.approx(2.15 / 3)
    assert r["backward_transfer"] == pytest.approx(-0.25)
    assert r["forward_transfer"] == pytest.approx(-0.025)
    assert r["average_forgetting"] == pytest.approx(0.25)
    assert r["train_seconds"] == [1.0, 2.0, 3.0]
    assert r["seed"] == 0
    assert not is_multi_seed(r)
    with pytest.raises(ValueError, match=r"train_seconds must have one entry per update \(3\), got 1"):
        build_result(R3, config=CONFIG, train_seconds=[1.0])


def test_write_report_single_run(tmp_path):
    result = _single()
    paths = write_report(tmp_path / "out", result)
    assert set(paths) == FILES
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)  # no temp files left

    assert json.loads(paths["results.json"].read_text()) == result

    rows = list(csv.reader(paths["accuracy_matrix.csv"].open()))
    assert rows[0] == ["after_update", "task0", "task1", "task2"]
    assert rows[1:] == [
        ["0", "0.9000", "0.1000", "0.2000"],
        ["1", "0.6000", "0.8000", "0.3000"],
        ["2", "0.5000", "0.7000", "0.9500"],
    ]

    metrics = {r[0]: r[1] for r in list(csv.reader(paths["metrics.csv"].open()))[1:]}
    assert paths["metrics.csv"].read_text().splitlines()[0] == "metric,value"
    assert float(metrics["average_accuracy"]) == pytest.approx(2.15 / 3, abs=1e-6)
    assert float(metrics["backward_transfer"]) == pytest.approx(-0.25)
    assert float(metrics["forward_transfer"]) == pytest.approx(-0.025)
    assert float(metrics["average_forgetting"]) == pytest.approx(0.25)
    assert float(metrics["train_seconds_total"]) == pytest.approx(6.0)

    _check_png(paths["accuracy_matrix.png"])
    _check_png(paths["task_accuracy.png"])


def test_write_report_overwrites_and_accepts_numpy(tmp_path):
    write_report(tmp_path, _single())
    result = {
        "config": {},
        "accuracy_matrix": np.array([[0.5, np.nan], [0.25, 0.75]]),
        "average_accuracy": np.float32(0.5),
        "backward_transfer": -0.25,
        "forward_transfer": None,
        "average_forgetting": 0.25,
        "train_seconds": np.array([1.5, 2.5]),
    }
    paths = write_report(tmp_path, result)
    loaded = json.loads(paths["results.json"].read_text())
    assert loaded["accuracy_matrix"] == [[0.5, None], [0.25, 0.75]]  # NaN -> null (strict JSON)
    assert loaded["train_seconds"] == [1.5, 2.5]
    assert paths["accuracy_matrix.csv"].read_text().splitlines()[1] == "0,0.5000,"
    _check_png(paths["accuracy_matrix.png"])


def test_single_task_report(tmp_path):
    result = build_result([[0.8]], config={"method": "er"}, train_seconds=[0.5])
    paths = write_report(tmp_path, result)
    _check_png(paths["accuracy_matrix.png"])
    _check_png(paths["task_accuracy.png"])
    assert "80.00" in format_table(result)


def test_write_report_multi_seed(tmp_path):
    runs = [
        _single(R3, seed=0, secs=(1.0, 1.0, 1.0)),
        _single(np.clip(np.array(R3) + 0.04, 0, 1), seed=1, secs=(2.0, 2.0, 2.0)),
    ]
    result = build_multi_seed_result(runs, seeds=[0, 1])
    assert is_multi_seed(result)
    assert result["seeds"] == [0, 1] and result["n_runs"] == 2 and result["config"] == CONFIG
    assert result["mean"]["train_seconds_total"] == pytest.approx(4.5)
    assert result["std"]["train_seconds_total"] == pytest.approx(math.sqrt(4.5))

    paths = write_report(tmp_path, result)
    assert set(paths) == FILES | {"accuracy_matrix_std.csv"}
    assert json.loads(paths["results.json"].read_text()) == result
    assert paths["metrics.csv"].read_text().splitlines()[0] == "metric,mean,std"
    mean_rows = list(csv.reader(paths["accuracy_matrix.csv"].open()))
    assert mean_rows[1][1] == "0.9200"  # (0.9 + 0.94) / 2
    std_rows = list(csv.reader(paths["accuracy_matrix_std.csv"].open()))
    assert float(std_rows[1][1]) == pytest.approx(np.std([0.9, 0.94], ddof=1), abs=1e-4)
    _check_png(paths["accuracy_matrix.png"])
    _check_png(paths["task_accuracy.png"])


def test_format_table_single():
    text = format_table(_single())
    for needle in ("der++", "split-mnist", "class-incremental", "task0", "task2", "90.00", "95.00", "30.00"):
        assert needle in text
    assert "71.67 %" in text  # ACC
    assert "-25.00 pp" in text  # BWT
    assert "-2.50 pp" in text  # FWT
    assert "25.00 pp" in text  # forgetting
    assert "6.0 s" in text  # total train time


def test_format_table_multi_seed_and_missing_fwt():
    runs = [build_result(R3, config=CONFIG, train_seconds=[1.0, 1.0, 1.0]) for _ in range(2)]
    text = format_table(build_multi_seed_result(runs, seeds=[3, 4]))
    assert "71.67 ± 0.00 %" in text
    assert "90.00±0.00" in text
    assert "2 seeds" in text
    assert "Forward transfer   : n/a" in text
    assert "3.0 ± 0.0 s" in text


def test_report_rejects_result_without_matrix(tmp_path):
    with pytest.raises(ValueError, match="result has no accuracy_matrix"):
        write_report(tmp_path, {"config": {}})
    assert list(tmp_path.iterdir()) == []


def test_write_report_leaves_the_global_matplotlib_backend_alone(tmp_path):
    # e.g. a notebook's interactive backend must survive a report (no matplotlib.use, no pyplot)
    code = (
        "import sys, matplotlib, retain.evaluation as e;"
        f"e.write_report({str(tmp_path)!r}, e.build_result([[0.5]], config={{}}, train_seconds=[1.0]));"
        "print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "accuracy_matrix.png").read_bytes()[:8] == PNG_MAGIC
