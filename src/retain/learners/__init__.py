"""Learners (training logic) and their components (weighted loss terms and re-initialisations)."""

from retain.learners.base import Learner, ReplayLearner
from retain.learners.components import (
    Component,
    ShrinkAndPerturbReinitializationComponent,
    WeightedCLSLossComponent,
    WeightedCustomLossComponent,
    WeightedMeanSquaredErrorLossComponent,
    WeightedPooledOutputDistillationLossComponent,
    pod_loss,
)

__all__ = [
    "Component",
    "Learner",
    "ReplayLearner",
    "ShrinkAndPerturbReinitializationComponent",
    "WeightedCLSLossComponent",
    "WeightedCustomLossComponent",
    "WeightedMeanSquaredErrorLossComponent",
    "WeightedPooledOutputDistillationLossComponent",
    "pod_loss",
]
