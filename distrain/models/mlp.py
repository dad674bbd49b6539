"""A multi-layer perceptron of any depth: Flatten, (Linear, activation, dropout) x N, Linear.

`log_softmax=True` appends LogSoftmax, for `loss=nll`; it does not change the argmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

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
        if isinstance(hidden_sizes, str) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden_sizes
        ):
            raise ValueError(
                "hidden_sizes must be a list of whole numbers >= 1 (one width per hidden layer; "
                f"[] for none), got {hidden_sizes!r}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (a probability of zeroing), got {dropout}")
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
