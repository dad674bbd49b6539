"""ResNet-18 from torchvision, randomly initialised, optionally with a stem for small images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def resnet18(
    input_shape: Sequence[int],
    num_outputs: int,
    small_input: bool = True,
    log_softmax: bool = False,
) -> nn.Module:
    """torchvision's ResNet-18 with `num_outputs` classes and `input_shape[0]` input channels.

    `small_input` (for 32x32 images such as CIFAR-10) swaps the 7x7 stride-2 stem conv for a 3x3
    stride-1 one and drops the max-pool: the ImageNet stem would shrink 32x32 to 8x8 before the
    first residual block and waste most of the network on a tiny feature map.
    `log_softmax` ends the classifier with LogSoftmax (parameter names become `fc.0.*`), for
    `loss=nll`.
    """
    from torchvision.models import resnet18 as tv_resnet18  # heavy import, only when used

    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise ValueError(f"resnet18 needs image inputs of shape (C, H, W), got input_shape={shape}")
    in_channels = shape[0]
    model = tv_resnet18(weights=None, num_classes=num_outputs)
    if log_softmax:
        model.fc = nn.Sequential(model.fc, nn.LogSoftmax(dim=1))
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return model
    # A replaced stem gets the init torchvision gives its own convs, not nn.Conv2d's default.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
