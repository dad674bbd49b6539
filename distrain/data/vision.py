"""MNIST, Fashion-MNIST and CIFAR-10 from torchvision's files, held in memory as tensors.

Each builder reads the official train/test files once through torchvision's dataset class, turns
the uint8 images into normalised float tensors of shape (N, C, H, W) and returns `TensorDataset`s,
so the worker batches by indexing instead of decoding PIL images one by one. The official test set
is the validation split. Nothing is downloaded unless `download=True` (`data.download=true`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from distrain.data.base import Splits

# Standard per-channel statistics of each training set (pixel values scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


class RandomCropFlip:
    """Random crop with zero padding plus random horizontal flip of a whole (N, C, H, W) batch.

    CIFAR-10's default `data.train_transforms` (conf/data/cifar10.yaml). Runs on the batch's own
    device with one gather: every sample gets its own crop offset and flip, expressed as
    row/column index tensors into the padded batch, so there is no Python loop over samples. The
    inputs are already normalised, so zero padding is the mean colour. A plain class (not a
    lambda) so Ray can pickle it into the worker.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if padding < 0:
            raise ValueError(f"crop padding must be >= 0 pixels, got {padding}")
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:  # one (C, H, W) sample, as a DataLoader's worker applies it
            return self(images[None])[0]
        if images.dim() != 4:
            raise ValueError(
                f"RandomCropFlip expects an (N, C, H, W) batch or a (C, H, W) image, got "
                f"{tuple(images.shape)}"
            )
        if self.padding == 0 and not self.flip:
            return images
        n, _, height, width = images.shape
        pad, device = self.padding, images.device
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        top = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        left = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        rows = top + torch.arange(height, device=device)  # (N, H)
        cols = torch.arange(width, device=device).expand(n, width)  # (N, W)
        if self.flip:
            # Reading the crop window's columns backwards is the flip of the crop.
            flipped = torch.rand(n, 1, device=device) < 0.5
            cols = torch.where(flipped, width - 1 - cols, cols)
        cols = cols + left
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indices around a slice put the broadcast (N, H, W) dims first: (N, H, W, C).
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def _check_limit(name: str, limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"data.{name} must be a positive number of samples or null, got {limit!r}")


def _normalise(
    images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 normalised, in place after the one unavoidable copy."""
    x = images_uint8.contiguous().float().div_(255.0)
    shape = (1, len(mean), 1, 1)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def _missing_error(
    name: str, root: str, folder: str, files: Sequence[str], download: bool, problem: str
) -> FileNotFoundError:
    where = os.path.join(root, folder)
    listed = ", ".join(files)
    how = (
        "download=true was set but fetching them failed (see the error chained above); "
        if download
        else ""
    )
    return FileNotFoundError(
        f"{name} not found under data.root={root!r}: expected the files {listed} in {where} "
        f"({problem}). {how}Run once with "
        f"data.download=true on a machine with internet access so torchvision fetches them, or "
        f"copy an existing {folder} directory there, or point data.root at the directory that "
        f"contains {folder.split(os.sep)[0]}."
    )


def _mnist_like(
    dataset_cls_name: str,
    name: str,
    root: str,
    download: bool,
    mean: Sequence[float],
    std: Sequence[float],
    limit_train: int | None,
    limit_val: int | None,
) -> Splits:
    from torchvision import datasets  # heavy import, only for the builders that need it

    _check_limit("limit_train", limit_train)
    _check_limit("limit_val", limit_val)
    root = os.path.abspath(os.path.expanduser(str(root)))
    dataset_cls = getattr(datasets, dataset_cls_name)
    tensors = []
    for train, limit in ((True, limit_train), (False, limit_val)):
        try:
            ds = dataset_cls(root, train=train, download=download)
        except (RuntimeError, OSError) as err:  # OSError: a failed download (URLError)
            folder = os.path.join(dataset_cls.__name__, "raw")
            # torchvision checks only that the uncompressed files exist (MD5s are for the .gz).
            raise _missing_error(
                name, root, folder, _MNIST_FILES, download, "one or more are missing"
            ) from err
        # torchvision keeps MNIST as a (N, 28, 28) uint8 tensor; cut before converting to float.
        images, labels = ds.data[:limit], ds.targets[:limit]
        x = _normalise(images.unsqueeze(1), mean, std)
        tensors.append(TensorDataset(x, labels.long()))
    return Splits(
        train=tensors[0],
        val=tensors[1],
        input_shape=tuple(tensors[0].tensors[0].shape[1:]),
        num_outputs=10,
    )


def mnist(
    root: str,
    download: bool = False,
    limit_train: int | None = None,
    limit_val: int | None = None,
) -> Splits:
    """Handwritten digits: 60,000 train / 10,000 val images of 1x28x28, 10 classes."""
    return _mnist_like(
        "MNIST", "MNIST", root, download, MNIST_MEAN, MNIST_STD, limit_train, limit_val
    )


def fashion_mnist(
    root: str,
    download: bool = False,
    limit_train: int | None = None,
    limit_val: int | None = None,
) -> Splits:
    """Zalando clothing: 60,000 train / 10,000 val images of 1x28x28, 10 classes."""
    return _mnist_like(
        "FashionMNIST",
        "Fashion-MNIST",
        root,
        download,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        limit_train,
        limit_val,
    )


def _cifar10_class(check_integrity: bool) -> type:
    """torchvision's CIFAR10, or the same class without the MD5s of the official release.

    torchvision compares every batch file with the MD5 of the official 160 MB download. Files
    re-packed by hand (a subset, or the tiny ones the tests write) cannot match it; with md5=None
    torchvision's own `check_integrity` checks only that each file exists, and everything else
    (unpickling, reshaping, the meta file) is the unchanged loading code.
    """
    from torchvision import datasets  # heavy import, only for the builders that need it

    if check_integrity:
        return datasets.CIFAR10
    official = datasets.CIFAR10

    class UncheckedCIFAR10(official):
        train_list: ClassVar = [[name, None] for name, _ in official.train_list]
        test_list: ClassVar = [[name, None] for name, _ in official.test_list]
        meta: ClassVar = {**official.meta, "md5": None}

    return UncheckedCIFAR10


def cifar10(
    root: str,
    download: bool = False,
    limit_train: int | None = None,
    limit_val: int | None = None,
    check_integrity: bool = True,
) -> Splits:
    """CIFAR-10: 50,000 train / 10,000 val images of 3x32x32, 10 classes.

    Augmentation is not built in: conf/data/cifar10.yaml lists `RandomCropFlip(padding=4)` as
    `data.train_transforms`, run per batch on the worker's device (`data/transforms.py`).
    `check_integrity=False` skips the MD5 check against the official release (files must still
    exist and be in its format): for a re-packed copy, or test files.
    """
    _check_limit("limit_train", limit_train)
    _check_limit("limit_val", limit_val)
    root = os.path.abspath(os.path.expanduser(str(root)))
    dataset_cls = _cifar10_class(check_integrity)
    problem = (
        "missing, or not matching the MD5 checksums of the official release; for a re-packed "
        "copy set data.check_integrity=false"
        if check_integrity
        else "one or more are missing; data.check_integrity=false skipped the MD5 check"
    )
    tensors = []
    for train, limit in ((True, limit_train), (False, limit_val)):
        try:
            ds = dataset_cls(root, train=train, download=download)
        except (RuntimeError, OSError) as err:  # OSError: a failed download (URLError)
            raise _missing_error(
                "CIFAR-10", root, "cifar-10-batches-py", _CIFAR10_FILES, download, problem
            ) from err
        # torchvision keeps CIFAR as a (N, 32, 32, 3) uint8 numpy array (HWC).
        images = torch.from_numpy(ds.data[:limit]).permute(0, 3, 1, 2)
        labels = torch.tensor(ds.targets[:limit], dtype=torch.long)
        tensors.append(TensorDataset(_normalise(images, CIFAR10_MEAN, CIFAR10_STD), labels))
    return Splits(
        train=tensors[0],
        val=tensors[1],
        input_shape=tuple(tensors[0].tensors[0].shape[1:]),
        num_outputs=10,
    )
