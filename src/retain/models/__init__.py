"""Models: the continual model base, its registry, an MLP and a CIFAR ResNet-18."""

from retain.models.base import (
    DEFAULT_TASK_ID,
    ContinualModel,
    RenateModule,
    build_model,
    rebuild_model,
    register_model,
    registered_models,
)
from retain.models.mlp import MultiLayerPerceptron
from retain.models.resnet import ResNet18

__all__ = [
    "DEFAULT_TASK_ID",
    "ContinualModel",
    "MultiLayerPerceptron",
    "RenateModule",
    "ResNet18",
    "build_model",
    "rebuild_model",
    "register_model",
    "registered_models",
]
