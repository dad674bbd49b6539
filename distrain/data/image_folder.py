"""Your own images, one sub-folder per class, read lazily by `torchvision.datasets.ImageFolder`.

Layout: `<root>/<class_name>/<image>.{png,jpg,...}`. Such a set may not fit in memory, so this
builder returns regular Datasets and the worker batches them with a `DataLoader`. Items are RGB
PIL images; `data.train_transforms` / `data.val_transforms` (conf/data/image_folder.yaml: resize
to `data.image_size` squared so batches stack, to tensor, normalise by `data.mean`/`data.std`)
turn them into tensors in the DataLoader's workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Subset

from distrain.data.base import Splits

# ImageNet statistics: a sensible default for natural photos when the set's own are unknown.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_folder(path: str, what: str):  # -> torchvision ImageFolder of PIL images
    from torchvision import datasets  # heavy import, only when this builder is used

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what}={path!r} is not a directory. Expected one sub-folder per class holding "
            f"its images, e.g. {os.path.join(path, 'cat', '0001.png')}."
        )
    try:
        return datasets.ImageFolder(path)
    except FileNotFoundError as err:  # no class folders, or class folders without images
        extensions = ", ".join(sorted(datasets.folder.IMG_EXTENSIONS))
        said = str(err) if "xtensions" in str(err) else f"{err} Image extensions: {extensions}."
        raise FileNotFoundError(
            f"{what}={path!r} holds no usable images: expected one sub-folder per class with "
            f"image files inside, e.g. {os.path.join(path, 'cat', '0001.png')}. "
            f"torchvision said: {said}"
        ) from err


def image_folder(
    root: str,
    val_root: str | None = None,
    val_fraction: float = 0.2,
    image_size: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> Splits:
    """Images in class folders under `root`; validation from `val_root` or a seeded split.

    With `val_root` set it must have the same class folders as `root`, and `val_fraction` is
    ignored; otherwise `val_fraction` of `root`'s images (seeded by `seed`) become validation.
    `image_size`, `mean` and `std` are the values the default transforms interpolate; they are
    checked here so a bad one is named. The input shape is measured after the transforms.
    """
    if int(image_size) < 1:
        raise ValueError(f"data.image_size must be a positive number of pixels, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"data.mean and data.std need one value per RGB channel (3), got {list(mean)} "
            f"and {list(std)}"
        )
    root = os.path.abspath(os.path.expanduser(str(root)))
    train_full = _load_folder(root, "data.root")

    if val_root is not None:
        val_root = os.path.abspath(os.path.expanduser(str(val_root)))
        val = _load_folder(val_root, "data.val_root")
        if val.class_to_idx != train_full.class_to_idx:
            raise ValueError(
                f"data.val_root={val_root!r} has class folders {val.classes} but data.root="
                f"{root!r} has {train_full.classes}; they must be the same so labels agree."
            )
        train = train_full
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if len(train_full) < 2:
            raise ValueError(
                f"data.root={root!r} has {len(train_full)} image(s); a train/val split needs "
                "at least 2 (or set data.val_root)."
            )
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(seed))
        num_val = min(len(train_full) - 1, max(1, round(len(train_full) * val_fraction)))
        val = Subset(train_full, order[:num_val].tolist())
        train = Subset(train_full, order[num_val:].tolist())

    return Splits(
        train=train,
        val=val,
        input_shape=None,  # what data.train_transforms make of an image
        num_outputs=len(train_full.classes),
    )
