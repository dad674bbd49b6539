"""A recurrent classifier: LSTM or GRU over (N, T, F) sequences, linear head on the final state."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNNClassifier(nn.Module):
    """Reads T steps of F features and predicts from the last layer's final hidden state.

    The final hidden state rather than the last time step's output: with `bidirectional` the
    backward direction's output at step T has seen only one step, its final state has seen all.
    `input_shape` is (T, F); longer shapes keep the last axis as features and flatten the rest
    into time, so an MNIST image (1, 28, 28) is read as 28 rows of 28 pixels.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        log_softmax: bool = False,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) < 2:
            raise ValueError(
                f"RNNClassifier needs sequence inputs of shape (T, F), got input_shape={shape}; "
                "a flat vector of T values is (T, 1)"
            )
        self.num_steps, self.num_features = math.prod(shape[:-1]), shape[-1]
        self.rnn = CELLS[cell](
            input_size=self.num_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
        )
        self.num_directions = 2 if bidirectional else 1
        self.head = nn.Linear(self.num_directions * hidden_size, num_outputs)
        self.log_softmax = log_softmax  # for loss=nll

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.num_steps, self.num_features)
        _, state = self.rnn(x)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        # h_n is (num_layers * directions, N, H); the last layer's directions are the last rows.
        last_layer = hidden[-self.num_directions :]
        out = self.head(last_layer.transpose(0, 1).reshape(len(x), -1))
        return out.log_softmax(dim=1) if self.log_softmax else out
