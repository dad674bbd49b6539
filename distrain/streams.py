"""Random streams that are a function of (configured rank, step, what draws), not of a process.

Each of the `trainer.workers` configured ranks has its own streams: the augmentation of its share
of a step's global batch (distrain/data/batches.py) and the forward pass (dropout) over that
share (distrain/step.py), each seeded afresh right before it draws. Whichever worker takes a share
then draws exactly what the configured rank would have: a worker that replaces a dead one, one of
a smaller group that stands for several ranks (elastic runs, survivors training on while a
replacement starts), a run resumed on another worker count. No generator state is carried in
checkpoints or handed over when a group heals: there is none to carry.
"""

from __future__ import annotations

import torch

from distrain import device as devices

AUGMENT, FORWARD = 0, 1  # what draws from a stream
STEP_STRIDE = 7919  # a prime: the seeds of different (rank, step) pairs do not collide
STREAM_STRIDE = 2**40  # the forward pass's seeds sit far from the augmentation's


def share_seed(seed: int, share: int, step: int, stream: int) -> int:
    """The seed of configured rank `share`'s `stream` in the step after `step` optimizer steps
    (trainer.seed = `seed`)."""
    return seed + 1 + share + STEP_STRIDE * step + STREAM_STRIDE * stream


def reseed(device: torch.device, seed: int) -> None:
    """Seed the generators this worker draws from: the CPU's and its own GPU's. (Not
    `torch.manual_seed`: it also seeds every other visible GPU, the node's other ranks'.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == devices.CUDA:
        torch.cuda.manual_seed(seed)  # the current device, set to this rank's by worker_device
