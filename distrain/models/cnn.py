"""A small conv net: (conv 3x3, ReLU, max-pool 2x2) per entry of `channels`, then an MLP head.

Sized for MNIST / CIFAR-like inputs: 1- or 3-channel (or any channel count) images of at least
8x8 pixels. Each block halves height and width, so the flatten width follows from `input_shape`.
`log_softmax=True` ends the head with LogSoftmax, for `loss=nll` (as in pytorch/examples' MNIST).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distrain.models.sizes import check_count, check_dropout, check_widths


class CNN(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
        log_softmax: bool = False,
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in input_shape)
        if len(shape) == 2:  # (H, W): a single-channel image stored without its channel axis
            shape = (1, *shape)
        if len(shape) != 3:
            raise ValueError(
                f"CNN needs image inputs of shape (C, H, W) or (H, W), got input_shape={shape}"
            )
        in_channels, height, width = shape
        if min(height, width) < 8:
            raise ValueError(f"CNN needs images of at least 8x8 pixels, got {height}x{width}")
        if not channels:
            raise ValueError("CNN needs at least one conv block in `channels`")
        check_widths("model.channels", channels, "the output channels of each conv block")
        check_count("model.hidden", hidden, "the width of the head's hidden layer")
        check_dropout(dropout)
        if height >> len(channels) < 1 or width >> len(channels) < 1:
            raise ValueError(
                f"{len(channels)} conv blocks each halve the image; {height}x{width} pixels "
                f"allow at most {min(height, width).bit_length() - 1}"
            )
        self.add_channel_axis = len(tuple(input_shape)) == 2

        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, int(out_channels), kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # floor division, like `>>` above
            ]
            in_channels = int(out_channels)
        self.features = nn.Sequential(*blocks)

        flat_width = in_channels * (height >> len(channels)) * (width >> len(channels))
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(flat_width, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_outputs))
        if log_softmax:
            head.append(nn.LogSoftmax(dim=1))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel_axis:
            x = x.unsqueeze(1)
        return self.head(self.features(x))
