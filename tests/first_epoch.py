"""Shared helper of the Joint tests (tests/joint): the batches of an update's first epoch, drawn
from its training source as the update starts and without changing what it then trains on."""

from __future__ import annotations

from typing import Any

import torch


class FirstEpoch:
    """Wraps ``learner.on_model_update_start``: once the update's data is set, draws one epoch from
    ``train_dataloader()`` into ``batches``, keeps the source and the generator state it started
    from (to build a reference with the same draws), and puts the generator back for the training."""

    def __init__(self, learner: Any) -> None:
        self.batches: list[Any] = []
        self.source: Any = None
        self.generator_state: torch.Tensor | None = None
        original = learner.on_model_update_start

        def capture(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            self.source = learner.train_dataloader()
            self.generator_state = learner.generator.get_state()
            self.batches.extend(self.source)
            learner.generator.set_state(self.generator_state)

        learner.on_model_update_start = capture

    def generator(self) -> torch.Generator:
        """A generator in the state the epoch's shuffle started from."""
        assert self.generator_state is not None, "the update has not started"
        return torch.Generator().set_state(self.generator_state)
