"""Language models from outside distrain, as a user would write them (named by `_target_`)."""

from __future__ import annotations

import torch
from torch import nn


class BigramLM(nn.Module):
    """Each position's logits from its own token alone: (B, T) -> (B, T, V), as the task needs."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


class LastTokenLM(BigramLM):
    """A mistake: logits for the last position only, (B, V) instead of (B, T, V)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx[:, -1])
