"""retain: continual learning that keeps what it learned.

Experience replay (ER, DER/DER++, POD-ER, CLS-ER, Super-ER) and Repeated Distillation over a
device-resident reservoir memory, with updaters that read and write safe, atomic state folders.
"""

from retain import _fast_start  # noqa: F401  (installs itself: the first optimizer without torch._dynamo)
from retain.memory import MemoryBatch, ReservoirMemory
from retain.methods import *  # noqa: F403
from retain.methods import __all__ as _methods_all
from retain.models import (
    ContinualModel,
    MultiLayerPerceptron,
    RenateModule,
    ResNet18,
    register_model,
)
from retain.options import TrainingOptions
from retain.state import StateError, StateLockedError
from retain.updaters import ModelUpdater, NonFiniteLossError, SingleTrainingLoopUpdater, load_model
from retain.version import __version__ as __version__

__all__ = [
    "ContinualModel",
    "MemoryBatch",
    "ModelUpdater",
    "MultiLayerPerceptron",
    "NonFiniteLossError",
    "RenateModule",
    "ReservoirMemory",
    "ResNet18",
    "SingleTrainingLoopUpdater",
    "StateError",
    "StateLockedError",
    "TrainingOptions",
    "load_model",
    "register_model",
    *_methods_all,
]
