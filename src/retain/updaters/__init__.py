"""Updaters: state folders in, one update, state folders out.

``distributed`` builds on ``base`` (it runs the ranks of a ``ModelUpdater``), so ``base`` cannot
import it: this package wires the multi-process runner into ``ModelUpdater.run_distributed``."""

from retain.updaters import distributed
from retain.updaters.base import ModelUpdater, SingleTrainingLoopUpdater, load_model, resolve_device
from retain.updaters.loop import FitResult, NonFiniteLossError, fit

ModelUpdater.run_distributed = staticmethod(distributed.distributed_update)

__all__ = [
    "FitResult",
    "ModelUpdater",
    "NonFiniteLossError",
    "SingleTrainingLoopUpdater",
    "fit",
    "load_model",
    "resolve_device",
]
