"""Models: the continual model base, its registry, an MLP and a CIFAR ResNet-18."""

from retain.models.adapter import PlainModuleAdapter, as_continual_model, forward_logits, unwrap
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
    "PlainModuleAdapter",
    "RenateModule",
    "ResNet18",
    "as_continual_model",
    "build_model",
    "forward_logits",
    "rebuild_model",
    "register_model",
    "registered_models",
    "unwrap",
]
