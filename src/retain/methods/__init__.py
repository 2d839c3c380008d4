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
    "SuperExperienceReplayLearner",
    "SuperExperienceReplayModelUpdater",
]
