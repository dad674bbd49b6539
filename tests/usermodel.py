"""A model from outside distrain, as a user would write one: any nn.Module, named by `_target_`.

It takes `input_shape` and `num_outputs` (filled in from the data) plus its own argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_outputs: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
