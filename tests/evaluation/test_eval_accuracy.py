"""accuracy / accuracy_row on a tiny linear model with known weights."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from retain.evaluation.evaluate import accuracy, accuracy_row

# logits = W x with W rows = classes 0, 1, 2
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 1.0]])
# logits: [2, 0, 1.2] [0, 2, 1.2] [1, 1, 1.2] [3, 1, 2.4]
# argmax over all classes:      0, 1, 2, 0
# argmax over classes {1, 2}:   2, 1, 2, 2
Y = torch.tensor([2, 1, 2, 1])
# correct: all classes -> idx 1, 2 -> 0.5 ; classes {1, 2} -> idx 0, 1, 2 -> 0.75


class TinyNet(nn.Module):
    """Linear classifier that records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(W)
        self.calls: list[dict] = []

    def forward(self, x, task_id=None):
        self.calls.append(
            {
                "task_id": task_id,
                "training": self.training,
                "head_training": self.head.training,
                "inference": torch.is_inference_mode_enabled(),
                "batch": x.shape[0],
                "dtype": x.dtype,
            }
        )
        return self.head(x)


def test_class_incremental_accuracy():
    model = TinyNet()
    assert accuracy(model, X, Y) == pytest.approx(0.5)


def test_task_incremental_masking_changes_the_answer():
    model = TinyNet()
    assert accuracy(model, X, Y, classes=[1, 2]) == pytest.approx(0.75)
    # only class 0 allowed: every prediction is 0, no target is 0
    assert accuracy(model, X, Y, classes=[0]) == 0.0


@pytest.mark.parametrize("batch_size", [1, 3, 4, 1024])
def test_batching_does_not_change_the_result(batch_size):
    model = TinyNet()
    assert accuracy(model, X, Y, batch_size=batch_size) == pytest.approx(0.5)
    assert [c["batch"] for c in model.calls] == [min(batch_size, 4 - s) for s in range(0, 4, batch_size)]


def test_transform_is_applied_to_each_batch():
    model = TinyNet()
    raw = (X * 10).to(torch.uint8)  # a Linear layer cannot take uint8 input
    acc = accuracy(model, raw, Y, transform=lambda x: x.float() / 10, batch_size=3)
    assert acc == pytest.approx(0.5)
    assert all(c["dtype"] == torch.float32 for c in model.calls)


def test_eval_mode_inference_mode_and_mode_restored():
    model = TinyNet()
    model.train()
    accuracy(model, X, Y, task_id="t0")
    call = model.calls[0]
    assert call == {**call, "task_id": "t0", "training": False, "head_training": False, "inference": True}
    assert model.training and model.head.training
    assert model.head.weight.grad is None

    model.eval()
    accuracy(model, X, Y)
    assert not model.training and not model.head.training

    # mixed modes (e.g. a frozen submodule kept in eval) are restored module by module
    model.train()
    model.head.eval()
    accuracy(model, X, Y)
    assert model.training and not model.head.training


def test_mode_restored_when_forward_raises():
    class Boom(TinyNet):
        def forward(self, x, task_id=None):
            raise RuntimeError("boom")

    model = Boom()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        accuracy(model, X, Y)
    assert model.training and model.head.training


def test_returns_python_float_and_validates_input():
    model = TinyNet()
    assert isinstance(accuracy(model, X, Y), float)
    with pytest.raises(ValueError, match="cannot compute accuracy on an empty input"):
        accuracy(model, X[:0], Y[:0])
    with pytest.raises(ValueError, match=r"inputs \(\d+\) and targets \(3\) differ in length"):
        accuracy(model, X, Y[:3])


def _tasks():
    # task 0: first two samples, classes {0, 1}; task 1: last two, classes {1, 2}
    return [
        SimpleNamespace(task_id="t0", classes=[0, 1], test=TensorDataset(X[:2], torch.tensor([0, 1]))),
        SimpleNamespace(task_id="t1", classes=[1, 2], test=TensorDataset(X[2:], torch.tensor([2, 1]))),
    ]


def test_accuracy_row_class_incremental():
    model = TinyNet()
    # task 0: preds 0, 1 -> 1.0 ; task 1: preds 2, 0 vs targets 2, 1 -> 0.5
    assert accuracy_row(model, _tasks()) == pytest.approx([1.0, 0.5])
    assert {c["task_id"] for c in model.calls} == {None}  # no task identity at test time


def test_accuracy_row_task_incremental():
    model = TinyNet()
    # task 0 within {0, 1}: preds 0, 1 -> 1.0 ; task 1 within {1, 2}: preds 2, 2 vs 2, 1 -> 0.5
    row = accuracy_row(model, _tasks(), task_incremental=True, batch_size=1)
    assert row == pytest.approx([1.0, 0.5])
    assert [c["task_id"] for c in model.calls] == ["t0", "t0", "t1", "t1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_accuracy_on_gpu_with_cpu_inputs():
    model = TinyNet().cuda()
    assert accuracy(model, X, Y, batch_size=3) == pytest.approx(0.5)
    assert accuracy(model, X, Y, classes=[1, 2]) == pytest.approx(0.75)
    raw = (X * 10).to(torch.uint8)
    assert accuracy(model, raw, Y, transform=lambda x: x.float() / 10) == pytest.approx(0.5)
