"""Class-incremental digits, one new updater per update built from the previous state folder:
joint training must clearly beat fine-tuning (which forgets the earlier tasks)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from retain import FineTuningModelUpdater, JointModelUpdater, ModelUpdater, MultiLayerPerceptron, load_model


def _accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(inputs).argmax(dim=1) == targets).float().mean())


def _run_stream(cls: type[ModelUpdater], tasks, folder: Path) -> list[float]:
    """All five updates, each by a fresh updater (fresh model object) continuing from the last folder;
    returns the final model's accuracy on every task's test set."""
    previous = None
    for i, (train, _) in enumerate(tasks):
        torch.manual_seed(1000 + i)  # a fresh model with other initial weights each time
        updater = cls(
            MultiLayerPerceptron(64, 10, [100, 100]),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05),
            input_state_folder=previous,
            output_state_folder=folder / f"after_task_{i}",
            batch_size=20,
            max_epochs=5,
            seed=0,
            accelerator="cpu",
        )
        updater.update(train)
        previous = folder / f"after_task_{i}"
    model = load_model(previous)
    return [_accuracy(model, *test) for _, test in tasks]


def test_joint_beats_fine_tuning_on_class_incremental_digits(digits_tasks, tmp_path: Path, capsys) -> None:
    fine_tuning = _run_stream(FineTuningModelUpdater, digits_tasks, tmp_path / "ft")
    joint = _run_stream(JointModelUpdater, digits_tasks, tmp_path / "joint")
    avg_ft, avg_joint = sum(fine_tuning) / 5, sum(joint) / 5
    with capsys.disabled():
        print(
            f"\nclass-incremental digits, average accuracy over 5 tasks: fine-tuning {avg_ft:.3f} "
            f"(per task {[round(a, 3) for a in fine_tuning]}), joint {avg_joint:.3f} "
            f"(per task {[round(a, 3) for a in joint]})"
        )
    assert fine_tuning[-1] > 0.75  # it learns the last task ...
    assert max(fine_tuning[:-1]) < 0.2  # ... and forgets the earlier ones
    assert min(joint) > 0.4 and avg_joint > 0.7  # joint keeps every task
    assert avg_joint > avg_ft + 0.3
