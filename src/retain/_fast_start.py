"""The first optimizer of a process without importing ``torch._dynamo`` (about 1 s of start-up).

Two wrappers in ``torch.optim`` import ``torch._dynamo`` (and with it sympy, ``torch._inductor``
and ``torch.fx``) on their first call, only to tell dynamo something:

- ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are
  wrapped by ``torch._compile._disable_dynamo``, which runs them with dynamo's frame evaluation
  turned off;
- the ``step`` of every built-in optimizer is wrapped by ``_use_grad_for_differentiable``, which
  sets grad mode from ``defaults['differentiable']`` around the step and calls
  ``torch._dynamo.graph_break()`` before and after it.

Before ``torch._dynamo`` is imported, no frame can be under dynamo (``torch.compile`` and
``torch.export`` import it first), so both are no-ops apart from the grad mode. ``install()``
makes these wrappers call the method directly (setting grad mode as torch does) while
``torch._dynamo`` is not in ``sys.modules``, and torch's own wrapper from the first call after it
was imported (importing this module installs it). Each patch is applied only where the wrapper
has exactly the shape of torch 2.13's; any other torch version is left as it is.

Measured (benchmarks/scale_joint.py, 2 shared cores): the first 10-step update of a process took
3.4 s (1.55 s CPU) against 0.17 s for the second; with this module 0.17 s (0.05 s CPU) for both.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _lazy_disable(fn: Callable[..., Any], recursive: bool) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(fn, recursive, wrapping=False)
        fn.__dynamo_disable = disabled  # type: ignore[attr-defined]  # torch's own cache from now on
        return disabled(*args, **kwargs)

    return call


def _lazy_use_grad(use_grad: Callable[..., Any], step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            return use_grad(*args, **kwargs)
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(args[0].defaults["differentiable"])
            return step(*args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    call.__retain_lazy_dynamo__ = True  # type: ignore[attr-defined]
    return call


def _optimizer_classes() -> list[type]:
    return [
        cls
        for cls in vars(torch.optim).values()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    ]


def install() -> None:
    """Applies the shortcuts to torch's optimizer classes (idempotent)."""
    for cls in _optimizer_classes():
        use_grad = cls.__dict__.get("step")
        step = getattr(use_grad, "__wrapped__", None)
        code = getattr(use_grad, "__code__", None)
        if step is None or code is None or code.co_name != "_use_grad" or code.co_freevars != ("func",):
            continue  # not torch's wrapper, already patched, or already hooked by an optimizer's __init__
        if getattr(use_grad, "hooked", False):
            continue
        cls.step = _lazy_use_grad(use_grad, step)
    for name in _METHODS:
        inner = getattr(torch.optim.Optimizer, name, None)
        fn = getattr(inner, "__wrapped__", None)
        code = getattr(inner, "__code__", None)
        if fn is None or code is None or code.co_freevars != ("fn", "recursive") or inner.__closure__ is None:
            continue  # another torch version: leave it as it is
        if getattr(fn, "__dynamo_disable", None) is not None:
            continue
        recursive = inner.__closure__[code.co_freevars.index("recursive")].cell_contents
        fn.__dynamo_disable = _lazy_disable(fn, recursive)  # type: ignore[attr-defined]


install()
