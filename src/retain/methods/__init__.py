"""Methods: each a learner (a list of components) plus a thin updater."""

from retain.methods.baselines import FineTuningModelUpdater, JointLearner, JointModelUpdater
from retain.methods.er import (
    BaseExperienceReplayLearner,
    CLSExperienceReplayLearner,
    CLSExperienceReplayModelUpdater,
    DarkExperienceReplayLearner,
    DarkExperienceReplayModelUpdater,
    ExperienceReplayLearner,
    ExperienceReplayModelUpdater,
    PooledOutputDistillationExperienceReplayLearner,
    PooledOutputDistillationExperienceReplayModelUpdater,
    SuperExperienceReplayLearner,
    SuperExperienceReplayModelUpdater,
)
from retain.methods.repeated_distill import (
    RepeatedDistillationLearner,
    RepeatedDistillationModelUpdater,
    double_distillation_loss,
    extract_logits,
)

__all__ = [
    "BaseExperienceReplayLearner",
    "CLSExperienceReplayLearner",
    "CLSExperienceReplayModelUpdater",
    "DarkExperienceReplayLearner",
    "DarkExperienceReplayModelUpdater",
    "ExperienceReplayLearner",
    "ExperienceReplayModelUpdater",
    "FineTuningModelUpdater",
    "JointLearner",
    "JointModelUpdater",
    "PooledOutputDistillationExperienceReplayLearner",
    "PooledOutputDistillationExperienceReplayModelUpdater",
    "RepeatedDistillationLearner",
    "RepeatedDistillationModelUpdater",
    "SuperExperienceReplayLearner",
    "SuperExperienceReplayModelUpdater",
    "double_distillation_loss",
    "extract_logits",
]
