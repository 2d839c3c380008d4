"""Nested tensors: a tensor, a tuple/list of nested tensors, or a dict (str keys) of them.

This is the input type of every item (Renate's ``NestedTensors``): an image batch is a tensor,
a HuggingFace text batch is a dict ``{"input_ids": ..., "attention_mask": ...}``, a multimodal
batch may be a tuple. The functions here walk such structures in one fixed order so that a
memory can keep one column per leaf, a state folder one tensor file entry per leaf, and a
batch be rebuilt exactly from its leaves.

Leaf paths are dotted names: ``""`` for a bare tensor, ``"0"``/``"1"`` for tuple items,
``"input_ids"`` for dict entries, ``"a.0"`` deeper down. Dict keys must be non-empty strings
without dots (so paths are unambiguous). Errors are one line naming the leaf path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

NestedTensors = Tensor | tuple["NestedTensors", ...] | list["NestedTensors"] | dict[str, "NestedTensors"]

__all__ = [
    "NestedTensors",
    "batch_size",
    "call_model",
    "cat",
    "detach",
    "flatten",
    "index",
    "is_nested",
    "leaves",
    "map_leaves",
    "pad_to",
    "structure",
    "structure_paths",
    "to_device",
    "unflatten",
]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _where(path: str) -> str:
    return f"leaf {path!r}" if path else "the input tensor"


def _not_nested(path: str, x: Any) -> TypeError:
    return TypeError(
        f"nested inputs: {_where(path)} is a {type(x).__name__}, expected a Tensor, tuple, list or dict of tensors"
    )


def _check_key(key: Any, path: str) -> str:
    if not isinstance(key, str) or not key or "." in key:
        where = path or "the top level"
        raise TypeError(f"nested inputs: dict key {key!r} at {where!r} must be a non-empty str without '.'")
    return key


def is_nested(x: Any) -> bool:
    """True if ``x`` is a tensor or a tuple/list/dict whose leaves are all tensors."""
    try:
        leaves(x)
    except TypeError:
        return False
    return True


def _walk(x: Any, path: str, out: list[tuple[str, Tensor]]) -> None:
    if isinstance(x, Tensor):
        out.append((path, x))
    elif isinstance(x, (tuple, list)):
        if not x:
            raise TypeError(f"nested inputs: empty {type(x).__name__} at {path or 'the top level'!r}")
        for i, item in enumerate(x):
            _walk(item, _join(path, str(i)), out)
    elif isinstance(x, Mapping):
        if not x:
            raise TypeError(f"nested inputs: empty dict at {path or 'the top level'!r}")
        for key, item in x.items():
            _walk(item, _join(path, _check_key(key, path)), out)
    else:
        raise _not_nested(path, x)


def leaves(x: NestedTensors) -> list[tuple[str, Tensor]]:
    """The ``(path, tensor)`` leaves of ``x`` in a fixed order (tuple order, dict insertion order)."""
    out: list[tuple[str, Tensor]] = []
    _walk(x, "", out)
    return out


def flatten(x: NestedTensors) -> dict[str, Tensor]:
    """``{path: tensor}`` for every leaf of ``x`` (ordered as :func:`leaves`)."""
    return dict(leaves(x))


def structure(x: NestedTensors) -> Any:
    """A JSON-able description of the nesting of ``x`` (kinds and keys, no data).

    ``"tensor"`` for a leaf, ``{"tuple": [...]}`` / ``{"list": [...]}`` for sequences and
    ``{"dict": [[key, sub], ...]}`` for dicts (a list of pairs, to keep key order in any JSON reader).
    """

    def build(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            return "tensor"
        if isinstance(node, (tuple, list)):
            if not node:
                raise TypeError(f"nested inputs: empty {type(node).__name__} at {path or 'the top level'!r}")
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {kind: [build(item, _join(path, str(i))) for i, item in enumerate(node)]}
        if isinstance(node, Mapping):
            if not node:
                raise TypeError(f"nested inputs: empty dict at {path or 'the top level'!r}")
            return {"dict": [[_check_key(k, path), build(v, _join(path, k))] for k, v in node.items()]}
        raise _not_nested(path, node)

    return build(x, "")


def structure_paths(struct: Any) -> list[str]:
    """The leaf paths a structure describes, in :func:`leaves` order."""
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if node == "tensor":
            out.append(path)
        elif isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("tuple", "list"):
            items = next(iter(node.values()))
            if not isinstance(items, list) or not items:
                raise ValueError(f"nested structure: malformed sequence at {path or 'the top level'!r}")
            for i, item in enumerate(items):
                walk(item, _join(path, str(i)))
        elif isinstance(node, dict) and len(node) == 1 and "dict" in node:
            items = node["dict"]
            if not isinstance(items, list) or not items:
                raise ValueError(f"nested structure: malformed dict at {path or 'the top level'!r}")
            for pair in items:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"nested structure: malformed dict entry at {path or 'the top level'!r}")
                key = pair[0]
                if not isinstance(key, str) or not key or "." in key:
                    raise ValueError(f"nested structure: bad dict key {key!r} at {path or 'the top level'!r}")
                walk(pair[1], _join(path, key))
        else:
            raise ValueError(f"nested structure: unknown node {node!r} at {path or 'the top level'!r}")

    walk(struct, "")
    return out


def unflatten(struct: Any, flat: Mapping[str, Tensor]) -> NestedTensors:
    """Rebuilds the nested value that :func:`structure` described from ``{path: tensor}``."""
    paths = structure_paths(struct)
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f"nested inputs: leaf {missing[0]!r} is missing")
    extra = sorted(set(flat) - set(paths))
    if extra:
        raise ValueError(f"nested inputs: leaf {extra[0]!r} is not in the structure")

    def build(node: Any, path: str) -> Any:
        if node == "tensor":
            return flat[path]
        kind, items = next(iter(node.items()))
        if kind == "tuple":
            return tuple(build(item, _join(path, str(i))) for i, item in enumerate(items))
        if kind == "list":
            return [build(item, _join(path, str(i))) for i, item in enumerate(items)]
        return {key: build(sub, _join(path, key)) for key, sub in items}

    return build(struct, "")


def map_leaves(fn: Callable[[Tensor], Tensor], x: NestedTensors) -> NestedTensors:
    """``x`` with ``fn`` applied to every leaf, the structure (tuple/list/dict kinds, keys) kept."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple):
        return tuple(map_leaves(fn, item) for item in x)
    if isinstance(x, list):
        return [map_leaves(fn, item) for item in x]
    if isinstance(x, Mapping):
        return {key: map_leaves(fn, item) for key, item in x.items()}
    leaves(x)  # raises the one-line TypeError
    raise AssertionError("unreachable")


def _map_with_path(fn: Callable[[str, Tensor], Tensor], x: Any, path: str = "") -> Any:
    if isinstance(x, Tensor):
        return fn(path, x)
    if isinstance(x, tuple):
        return tuple(_map_with_path(fn, item, _join(path, str(i))) for i, item in enumerate(x))
    if isinstance(x, list):
        return [_map_with_path(fn, item, _join(path, str(i))) for i, item in enumerate(x)]
    if isinstance(x, Mapping):
        return {key: _map_with_path(fn, item, _join(path, _check_key(key, path))) for key, item in x.items()}
    raise _not_nested(path, x)


def to_device(x: NestedTensors, device: torch.device | str, non_blocking: bool = False) -> NestedTensors:
    """Every leaf moved to ``device`` (no copy for leaves already there)."""
    if isinstance(x, Tensor):  # fast path: the common case of a bare tensor
        return x.to(device, non_blocking=non_blocking)
    return map_leaves(lambda t: t.to(device, non_blocking=non_blocking), x)


def detach(x: NestedTensors) -> NestedTensors:
    """Every leaf detached from the autograd graph."""
    if isinstance(x, Tensor):
        return x.detach()
    return map_leaves(lambda t: t.detach(), x)


def batch_size(x: NestedTensors) -> int:
    """The leading dimension shared by all leaves; ValueError naming the first leaf that differs."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("nested inputs: the input tensor is 0-d, expected a batch dimension")
        return int(x.shape[0])
    n: int | None = None
    first = ""
    for path, leaf in leaves(x):
        if leaf.dim() == 0:
            raise ValueError(f"nested inputs: {_where(path)} is 0-d, expected a batch dimension")
        if n is None:
            n, first = int(leaf.shape[0]), path
        elif leaf.shape[0] != n:
            raise ValueError(
                f"nested inputs: {_where(path)} has {leaf.shape[0]} rows, {_where(first)} has {n}"
            )
    assert n is not None
    return n


def index(x: NestedTensors, idx: Tensor | slice | int | Sequence[int]) -> NestedTensors:
    """The rows ``idx`` of every leaf (``leaf[idx]``)."""
    if isinstance(x, Tensor):
        return x[idx]
    return map_leaves(lambda t: t[idx], x)


def _pad_leaf(path: str, t: Tensor, shape: Sequence[int], value: float) -> Tensor:
    """``t`` padded at the end of every non-batch dim to ``shape`` (per-item shape) with ``value``."""
    if t.dim() - 1 != len(shape):
        raise ValueError(
            f"nested inputs: {_where(path)} has per-item shape {tuple(t.shape[1:])}, cannot pad to {tuple(shape)}"
        )
    if tuple(t.shape[1:]) == tuple(shape):
        return t
    for have, want in zip(t.shape[1:], shape, strict=True):
        if have > want:
            raise ValueError(
                f"nested inputs: {_where(path)} has per-item shape {tuple(t.shape[1:])}, "
                f"longer than the target {tuple(shape)}"
            )
    out = t.new_full((t.shape[0], *shape), value)
    out[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
    return out


def pad_to(
    x: NestedTensors, shapes: Mapping[str, Sequence[int]], pad_values: Mapping[str, float] | None = None
) -> NestedTensors:
    """``x`` with every leaf padded at the end of its non-batch dims to ``shapes[path]``.

    ``pad_values`` maps leaf paths to the fill value (default 0); a leaf longer than its target
    shape, or of a different number of dims, is refused.
    """
    pads = pad_values or {}

    def fn(path: str, t: Tensor) -> Tensor:
        if path not in shapes:
            raise ValueError(f"nested inputs: no target shape for {_where(path)}")
        return _pad_leaf(path, t, shapes[path], pads.get(path, 0))

    return _map_with_path(fn, x)


def cat(xs: Sequence[NestedTensors], pad_values: Mapping[str, float] | None = None) -> NestedTensors:
    """Concatenates nested batches along dim 0, padding each leaf's non-batch dims to the max across ``xs``.

    All ``xs`` must have the same structure and, per leaf, the same dtype and number of dims.
    The pad value of a leaf is ``pad_values[path]`` (default 0). This is how a replayed batch
    joins a new batch that was padded to a different length.
    """
    if not xs:
        raise ValueError("nested inputs: cat of no batches")
    if all(isinstance(x, Tensor) for x in xs):
        tensors: list[Tensor] = list(xs)  # type: ignore[arg-type]
        first = tensors[0]
        if all(t.shape[1:] == first.shape[1:] and t.dtype == first.dtype for t in tensors):
            return torch.cat(tensors)  # fast path, no padding needed
    struct = structure(xs[0])
    flats = []
    for i, x in enumerate(xs):
        if structure(x) != struct:
            raise ValueError(f"nested inputs: batch {i} has structure {structure(x)}, batch 0 has {struct}")
        flats.append(flatten(x))
    pads = pad_values or {}
    joined: dict[str, Tensor] = {}
    for path in flats[0]:
        parts = [f[path] for f in flats]
        dims = {p.dim() for p in parts}
        if len(dims) != 1:
            raise ValueError(f"nested inputs: {_where(path)} has different numbers of dims across batches")
        dtypes = {p.dtype for p in parts}
        if len(dtypes) != 1:
            names = sorted(map(str, dtypes))
            raise ValueError(f"nested inputs: {_where(path)} has different dtypes across batches: {names}")
        if parts[0].dim() == 0:
            raise ValueError(f"nested inputs: {_where(path)} is 0-d, expected a batch dimension")
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        joined[path] = torch.cat([_pad_leaf(path, p, shape, pads.get(path, 0)) for p in parts])
    return unflatten(struct, joined)


def call_model(model: Callable[..., Any], x: NestedTensors) -> Any:
    """Calls ``model`` on nested inputs: tensor -> ``model(x)``, tuple/list -> ``model(*x)``, dict -> ``model(**x)``.

    Returns the output's ``.logits`` when it has one (HuggingFace model outputs), else the output.
    """
    if isinstance(x, Tensor):
        out = model(x)
    elif isinstance(x, (tuple, list)):
        out = model(*x)
    elif isinstance(x, Mapping):
        out = model(**x)
    else:
        leaves(x)  # raises the one-line TypeError
        raise AssertionError("unreachable")
    if not isinstance(out, Tensor):
        logits = getattr(out, "logits", None)
        if isinstance(logits, Tensor):
            return logits
    return out
