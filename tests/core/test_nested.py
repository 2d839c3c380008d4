"""retain.nested: leaf order and paths, rebuild, batching, padding and model calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from retain import nested


def _example() -> dict:
    return {
        "input_ids": torch.arange(6).view(2, 3),
        "pair": (torch.ones(2, 4), [torch.zeros(2), torch.full((2, 1), 7.0)]),
        "mask": torch.ones(2, 3, dtype=torch.bool),
    }


def test_leaves_paths_in_fixed_order() -> None:
    x = _example()
    assert [p for p, _ in nested.leaves(x)] == ["input_ids", "pair.0", "pair.1.0", "pair.1.1", "mask"]
    assert nested.leaves(x)[0][1] is x["input_ids"]
    t = torch.zeros(3)
    assert nested.leaves(t) == [("", t)]
    assert [p for p, _ in nested.leaves((t, t))] == ["0", "1"]


def test_structure_is_json_and_unflatten_rebuilds_kinds_and_keys() -> None:
    x = _example()
    struct = nested.structure(x)
    struct = json.loads(json.dumps(struct))  # survives a JSON round trip
    rebuilt = nested.unflatten(struct, nested.flatten(x))
    assert isinstance(rebuilt, dict) and list(rebuilt) == ["input_ids", "pair", "mask"]
    assert isinstance(rebuilt["pair"], tuple) and isinstance(rebuilt["pair"][1], list)
    for (p1, a), (p2, b) in zip(nested.leaves(x), nested.leaves(rebuilt), strict=True):
        assert p1 == p2 and a is b
    assert nested.structure_paths(struct) == list(nested.flatten(x))
    t = torch.ones(2)
    assert nested.unflatten(nested.structure(t), {"": t}) is t


def test_unflatten_names_missing_and_extra_leaves() -> None:
    struct = nested.structure({"a": torch.ones(1), "b": (torch.ones(1),)})
    with pytest.raises(ValueError, match=r"leaf 'b\.0' is missing"):
        nested.unflatten(struct, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match=r"leaf 'c' is not in the structure"):
        nested.unflatten(struct, {"a": torch.ones(1), "b.0": torch.ones(1), "c": torch.ones(1)})
    with pytest.raises(ValueError, match="unknown node"):
        nested.unflatten({"set": []}, {})


def test_bad_leaves_and_keys_name_the_path() -> None:
    with pytest.raises(TypeError, match=r"leaf 'a\.1' is a str"):
        nested.leaves({"a": (torch.ones(1), "text")})
    with pytest.raises(TypeError, match=r"dict key 3 at 'a'"):
        nested.leaves({"a": {3: torch.ones(1)}})
    with pytest.raises(TypeError, match=r"dict key 'x\.y'"):
        nested.structure({"x.y": torch.ones(1)})
    with pytest.raises(TypeError, match="empty tuple"):
        nested.leaves(())
    assert not nested.is_nested([1, 2]) and nested.is_nested([torch.ones(1)])


def test_map_leaves_to_device_detach_index_keep_structure() -> None:
    w = torch.ones(2, 3, requires_grad=True)
    x = {"a": w * 2, "b": (w.sum(1),)}
    d = nested.detach(x)
    assert not d["a"].requires_grad and not d["b"][0].requires_grad and isinstance(d["b"], tuple)
    m = nested.map_leaves(lambda t: t + 1, d)
    assert torch.equal(m["a"], d["a"] + 1)
    moved = nested.to_device(d, "cpu")
    assert moved["a"].device.type == "cpu" and isinstance(moved["b"], tuple)
    rows = nested.index(d, torch.tensor([1]))
    assert rows["a"].shape == (1, 3) and rows["b"][0].shape == (1,)


def test_batch_size_agrees_or_names_the_leaf() -> None:
    assert nested.batch_size(_example()) == 2
    assert nested.batch_size(torch.zeros(5, 2)) == 5
    with pytest.raises(ValueError, match=r"leaf 'b\.0' has 3 rows, leaf 'a' has 2"):
        nested.batch_size({"a": torch.zeros(2), "b": [torch.zeros(3)]})
    with pytest.raises(ValueError, match=r"leaf 'a' is 0-d"):
        nested.batch_size({"a": torch.tensor(1.0)})


def test_cat_pads_each_leaf_to_the_longest_with_its_pad_value() -> None:
    short = {"ids": torch.tensor([[1, 2]]), "mask": torch.tensor([[1, 1]]), "img": torch.ones(1, 2, 2)}
    long = {"ids": torch.tensor([[3, 4, 5, 6]]), "mask": torch.tensor([[1, 1, 1, 0]]), "img": torch.ones(1, 2, 2)}
    out = nested.cat([short, long], pad_values={"ids": -100})
    assert out["ids"].tolist() == [[1, 2, -100, -100], [3, 4, 5, 6]]
    assert out["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]  # default pad 0
    assert out["img"].shape == (2, 2, 2)
    t = nested.cat([torch.ones(1, 3), torch.zeros(2, 3)])
    assert t.shape == (3, 3)
    # two variable dims at once
    a, b = torch.ones(1, 1, 3), torch.ones(1, 2, 1)
    both = nested.cat([a, b], pad_values={"": 9})
    assert both.shape == (2, 2, 3) and both[0, 1].tolist() == [9, 9, 9] and both[1, :, 1:].eq(9).all()


def test_cat_refusals_name_the_leaf() -> None:
    with pytest.raises(ValueError, match="batch 1 has structure"):
        nested.cat([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    with pytest.raises(ValueError, match=r"leaf 'a' has different dtypes"):
        nested.cat([{"a": torch.ones(1)}, {"a": torch.ones(1, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"leaf 'a' has different numbers of dims"):
        nested.cat([{"a": torch.ones(1)}, {"a": torch.ones(1, 2)}])
    with pytest.raises(ValueError, match=r"the input tensor has different dtypes across batches"):
        nested.cat([torch.ones(1, 2), torch.ones(1, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="cat of no batches"):
        nested.cat([])


def test_pad_to_pads_and_refuses_longer() -> None:
    x = (torch.ones(2, 2), torch.ones(2, 1))
    out = nested.pad_to(x, {"0": (3,), "1": (1,)}, {"0": 5})
    assert out[0].tolist() == [[1, 1, 5], [1, 1, 5]] and out[1] is x[1]
    with pytest.raises(ValueError, match=r"leaf '0' has per-item shape \(2,\), longer than the target \(1,\)"):
        nested.pad_to(x, {"0": (1,), "1": (1,)})
    with pytest.raises(ValueError, match=r"no target shape for leaf '1'"):
        nested.pad_to(x, {"0": (2,)})


def test_call_model_dispatches_and_unwraps_logits() -> None:
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(nested.call_model(lin, x), lin(x))

    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    assert torch.equal(nested.call_model(Two(), (x, x)), 2 * x)
    assert torch.equal(nested.call_model(Two(), [x, x]), 2 * x)

    class HF(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=input_ids.float() * attention_mask)

    batch = {"input_ids": torch.ones(2, 2, dtype=torch.long), "attention_mask": torch.zeros(2, 2)}
    out = nested.call_model(HF(), batch)
    assert isinstance(out, torch.Tensor) and out.eq(0).all()
