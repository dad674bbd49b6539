"""Tiny datasets written in the real on-disk formats, for tests that load them through the real
code (torchvision's readers, ImageFolder, numpy/torch files): no network, no mocks."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: big-endian magic (0x08 = uint8 in byte 3, ndim in byte 4), dims, data."""
    assert array.dtype == np.uint8
    header = struct.pack(">i", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str, num_train: int = 6, num_test: int = 4) -> dict:
    """`<root>/<folder>/raw/` as torchvision's MNIST (folder "MNIST") or FashionMNIST reads it.

    torchvision reads the uncompressed files and, for MNIST, checks only that they exist (the
    MD5s it lists are for the .gz downloads). Returns {"train"|"t10k": (images, labels)}.
    """
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(1, 255, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 255, 0  # known pixels for the normalisation check
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def write_cifar(root: Path, per_batch: int = 2, num_test: int = 3) -> dict:
    """The python-version CIFAR-10 layout: pickled dicts with uint8 rows of R, G, B planes.

    The files cannot match the MD5s of the official release: load them with
    `check_integrity=False` (data.check_integrity=false). Returns {file name: (data, labels)}.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        n = num_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        if index == 0:  # image 0, pixel (0, 0): R=255, G=0, B=51 (0.2)
            data[0, 0], data[0, 1024], data[0, 2048] = 255, 0, 51
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": ["x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
        out[name] = (data, labels)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return out


def write_pngs(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int) -> None:
    """`<root>/<class>/<i>.png`: 12x10 images of one colour per class, for ImageFolder."""
    from PIL import Image

    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i}.png")
