"""Shared helpers for the variable-length sequence tests (tests/joint, tests/workloads): a collate
that pads each batch to its longest item with one pad id, and a padding-invariant classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAD = 7  # a pad token id other than 0: memories, chunks and joins must use the declared pad value


def pad_collate(items: list[dict]) -> dict[str, Tensor]:
    """Items ``{"input_ids": (L,), "labels": c}`` -> ``input_ids`` padded with ``PAD`` to the longest
    item, ``attention_mask`` (0 on padding) and ``labels``."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), longest), PAD, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
    labels = torch.tensor([item["labels"] for item in items])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


class MaskedMean(nn.Module):
    """``linear(masked mean of embeddings)`` over 40 token ids: padding cannot change a logit, except
    through the mask, so logits of a padded item equal those of the item alone."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, num_outputs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.out((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))
