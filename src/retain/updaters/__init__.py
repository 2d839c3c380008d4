"""Updaters: state folders in, one update, state folders out."""

from retain.updaters.base import ModelUpdater, SingleTrainingLoopUpdater, load_model, resolve_device
from retain.updaters.loop import FitResult, NonFiniteLossError, fit

__all__ = [
    "FitResult",
    "ModelUpdater",
    "NonFiniteLossError",
    "SingleTrainingLoopUpdater",
    "fit",
    "load_model",
    "resolve_device",
]
