"""A multi-layer perceptron of any depth: Flatten, (Linear, activation, dropout) x N, Linear.

`log_softmax=True` appends LogSoftmax, for `loss=nll`; it does not change the argmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from distrain.models.sizes import check_dropout, check_widths

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Sequential):
    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
        log_softmax: bool = False,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        check_widths("model.hidden_sizes", hidden_sizes, "one width per hidden layer; [] for none")
        check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        if log_softmax:
            layers.append(nn.LogSoftmax(dim=1))  # no parameters: state_dict keys unchanged
        super().__init__(*layers)
