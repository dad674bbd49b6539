"""Dataset builders on tiny files written here in the real on-disk formats (no network/mocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from distrain.build import build_splits
from distrain.config import DataConfig
from distrain.data.image_folder import image_folder
from distrain.data.synthetic import synthetic
from distrain.data.tensors import tensors
from distrain.data.vision import RandomCropFlip, cifar10, fashion_mnist, mnist
from tests.conftest import compose_job
from tests.fakedata import write_cifar, write_mnist, write_pngs

# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)


@pytest.mark.parametrize(
    ("builder", "folder", "mean", "std"),
    [(mnist, "MNIST", 0.1307, 0.3081), (fashion_mnist, "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_like_reads_idx_files(tmp_path, builder, folder, mean, std):
    written = write_mnist(tmp_path, folder)
    splits = builder(root=str(tmp_path))

    assert splits.in_memory and splits.train_transform is None
    assert splits.input_shape == (1, 28, 28) and splits.num_outputs == 10
    x, y = splits.train.tensors
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == written["train"][1].tolist()
    assert splits.val.tensors[0].shape == (4, 1, 28, 28)
    assert x[0, 0, 0, 0].item() == pytest.approx((1.0 - mean) / std, abs=1e-5)
    assert x[0, 0, 0, 1].item() == pytest.approx(-mean / std, abs=1e-5)
    expected = (torch.from_numpy(written["t10k"][0]).float() / 255 - mean) / std
    torch.testing.assert_close(splits.val.tensors[0][:, 0], expected)


def test_mnist_limits_and_home_expansion(tmp_path, monkeypatch):
    write_mnist(tmp_path, "MNIST")
    monkeypatch.setenv("HOME", str(tmp_path))
    splits = mnist(root="~", limit_train=3, limit_val=2)
    assert len(splits.train) == 3 and len(splits.val) == 2
    with pytest.raises(ValueError, match="limit_train"):
        mnist(root=str(tmp_path), limit_train=0)


def test_mnist_missing_files_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        mnist(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "data.download=true" in message


# ---------------------------------------------------------------- CIFAR-10 (pickled batches)


def test_cifar10_reads_pickled_batches(tmp_path):
    written = write_cifar(tmp_path)
    # The tiny files cannot match the official MD5s; everything else is torchvision's real code.
    splits = cifar10(root=str(tmp_path), check_integrity=False)

    assert splits.in_memory and splits.input_shape == (3, 32, 32) and splits.num_outputs == 10
    x, y = splits.train.tensors
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    assert splits.val.tensors[0].shape == (3, 3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    for channel, value in enumerate((1.0, 0.0, 0.2)):  # channel order R, G, B preserved
        expected = (value - mean[channel]) / std[channel]
        assert x[0, channel, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    # Row-major planes: byte 32 of the R plane is pixel (row 1, column 0).
    raw_value = written["data_batch_1"][0][0, 32] / 255
    assert x[0, 0, 1, 0].item() == pytest.approx((raw_value - mean[0]) / std[0], abs=1e-5)

    # Augmentation comes from conf/data/cifar10.yaml's train_transforms, not the builder.
    assert splits.train_transform is None
    few = cifar10(root=str(tmp_path), limit_train=4, limit_val=1, check_integrity=False)
    assert len(few.train) == 4 and len(few.val) == 1


def test_cifar10_missing_or_corrupt_files_name_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        cifar10(root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "data.download=true" in message
    # The unmodified class rejects files whose MD5 is not the official one: same clear error.
    write_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="MD5 checksums"):
        cifar10(root=str(tmp_path))
    # Without the MD5 check a missing file is still refused, and the message says the check is off.
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="check_integrity=false skipped the MD5 check"):
        cifar10(root=str(tmp_path), check_integrity=False)


# ---------------------------------------------------------------- RandomCropFlip


def test_random_crop_flip_identity_and_shape():
    batch = torch.randn(16, 3, 8, 8)
    assert RandomCropFlip(padding=0, flip=False)(batch) is batch
    out = RandomCropFlip(padding=4, flip=True)(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)


def test_random_crop_flip_takes_one_image_as_a_batch_of_one():
    """Per sample, as a DataLoader worker applies it (data.loader=dataloader)."""
    image = torch.randn(3, 8, 8)
    torch.manual_seed(0)
    one = RandomCropFlip(padding=2)(image)
    torch.manual_seed(0)
    torch.testing.assert_close(one, RandomCropFlip(padding=2)(image[None])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) batch or a \(C, H, W\) image"):
        RandomCropFlip()(torch.randn(8, 8))


def test_random_crop_flip_flips_some_samples():
    torch.manual_seed(0)
    batch = torch.randn(64, 2, 5, 7)
    out = RandomCropFlip(padding=0, flip=True)(batch)
    same = (out == batch).flatten(1).all(1)
    flipped = (out == batch.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0 < int(flipped.sum()) < 64


def test_random_crop_flip_crops_shifted_windows():
    torch.manual_seed(0)
    pad, batch = 2, torch.randn(32, 3, 6, 6) + 10  # +10: no real pixel looks like padding
    out = RandomCropFlip(padding=pad, flip=False)(batch)
    padded = torch.nn.functional.pad(batch, (pad,) * 4)
    windows = [(top, left) for top in range(2 * pad + 1) for left in range(2 * pad + 1)]
    offsets = []
    for i in range(len(batch)):
        matches = [
            (top, left)
            for top, left in windows
            if torch.equal(out[i], padded[i, :, top : top + 6, left : left + 6])
        ]
        assert matches, f"sample {i} is not a crop of its padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1 and any(o != (pad, pad) for o in offsets)
    assert bool((out == 0).any())  # some zero padding came into view


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_reads_class_folders(tmp_path):
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    write_pngs(tmp_path / "train", colours, per_class=4)
    # Resize, to tensor and normalise are conf/data/image_folder.yaml's default transforms.
    job = compose_job(
        "data=image_folder",
        f"data.root={tmp_path / 'train'}",
        "data.image_size=8",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]",
        "data.seed=1",
    )
    splits = build_splits(DataConfig.of(job["data"]))
    assert not splits.in_memory
    assert splits.input_shape == (3, 8, 8) and splits.num_outputs == 3
    assert len(splits.train) + len(splits.val) == 12 and len(splits.val) == 2  # round(12 * 0.2)
    for dataset in (splits.train, splits.val):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 8, 8) and image.dtype == torch.float32
            # Classes are sorted folder names, so label 2 is red: (255, 0, 0) -> (1, -1, -1).
            expected = torch.full((3, 8, 8), -1.0)
            expected[2 - label] = 1.0
            torch.testing.assert_close(image, expected)

    write_pngs(tmp_path / "val", colours, per_class=1)
    with_val = image_folder(root=str(tmp_path / "train"), val_root=str(tmp_path / "val"))
    assert len(with_val.train) == 12 and len(with_val.val) == 3
    assert with_val.input_shape is None  # measured after the transforms, by build_splits


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        image_folder(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no usable images") as info:
        image_folder(root=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)
    write_pngs(tmp_path / "a", {"cat": (1, 2, 3), "dog": (4, 5, 6)}, per_class=2)
    write_pngs(tmp_path / "b", {"cat": (1, 2, 3), "eel": (4, 5, 6)}, per_class=1)
    with pytest.raises(ValueError, match="must be the same"):
        image_folder(root=str(tmp_path / "a"), val_root=str(tmp_path / "b"))


# ---------------------------------------------------------------- .npz / .pt tensors


def test_tensors_npz_classification(tmp_path):
    path = tmp_path / "data.npz"
    x = np.random.default_rng(0).normal(size=(20, 2, 3))
    np.savez(path, features=x, labels=np.arange(20) % 4)
    splits = tensors(path=str(path), x_key="features", y_key="labels", val_fraction=0.25)
    assert splits.in_memory and splits.input_shape == (2, 3) and splits.num_outputs == 4
    assert len(splits.train) == 15 and len(splits.val) == 5
    assert splits.train.tensors[0].dtype == torch.float32
    assert splits.train.tensors[1].dtype == torch.long


def test_tensors_pt_regression(tmp_path):
    path = tmp_path / "data.pt"
    torch.save({"x": torch.randn(10, 4), "y": torch.randn(10)}, path)
    splits = tensors(path=str(path), task="regression")
    assert splits.task == "regression" and splits.num_outputs == 1
    targets = splits.train.tensors[1]
    assert targets.shape == (8, 1) and targets.dtype == torch.float32
    torch.save({"x": torch.randn(10, 4), "y": torch.randn(10, 3)}, path)
    assert tensors(path=str(path), task="regression").num_outputs == 3


def test_tensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tensors(path=str(tmp_path / "absent.npz"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.npz, \.pt"):
        tensors(path=str(tmp_path / "data.csv"))
    np.savez(tmp_path / "named.npz", inputs=np.zeros((4, 2)), targets=np.zeros(4))
    with pytest.raises(ValueError, match=r"no array named 'x', 'y'.*\['inputs', 'targets'\]"):
        tensors(path=str(tmp_path / "named.npz"))
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="'x' has 4 samples but 'y' has 3"):
        tensors(path=str(tmp_path / "short.npz"))
    np.savez(tmp_path / "frac.npz", x=np.zeros((4, 2)), y=np.array([0, 1.5, 2, 3]))
    with pytest.raises(ValueError, match="whole numbers"):
        tensors(path=str(tmp_path / "frac.npz"))


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_shaped():
    a = synthetic(num_samples=100, input_shape=(3, 8, 8), num_classes=5, seed=3)
    b = synthetic(num_samples=100, input_shape=[3, 8, 8], num_classes=5, seed=3)
    c = synthetic(num_samples=100, input_shape=(3, 8, 8), num_classes=5, seed=4)
    assert isinstance(a.train, TensorDataset) and a.input_shape == (3, 8, 8)
    assert a.num_outputs == 5 and len(a.train) == 80 and len(a.val) == 20
    for left, right in zip(
        a.train.tensors + a.val.tensors, b.train.tensors + b.val.tensors, strict=True
    ):
        assert torch.equal(left, right)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])

    seq = synthetic(num_samples=50, input_shape=(7, 4), num_classes=3, seed=0)
    assert seq.train.tensors[0].shape == (40, 7, 4) and seq.train.tensors[1].dtype == torch.long
    reg = synthetic(num_samples=50, input_shape=(6,), num_classes=2, task="regression")
    assert reg.task == "regression" and reg.train.tensors[1].shape == (40, 2)
    with pytest.raises(ValueError, match="task"):
        synthetic(task="ranking")


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    splits = synthetic(num_samples=3000, input_shape=(20,), num_classes=4, seed=0)
    (x, y), (x_val, y_val) = splits.train.tensors, splits.val.tensors
    counts = torch.bincount(y, minlength=4)
    assert counts.min() > 0.1 * len(y)  # every class present, roughly balanced
    chance = counts.max().item() / len(y)
    model = torch.nn.Linear(20, 4)  # logistic regression
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert accuracy > chance + 0.3, (accuracy, chance)


# ---------------------------------------------------------------- scikit-learn's embedded sets


@pytest.mark.parametrize("name", ["digits", "iris"])
def test_embedded_sets_equal_scikit_learns_loaders(name):
    """Read from scikit-learn's files without importing it: the same values as its loaders."""
    from sklearn import datasets

    from distrain.data import sklearn as embedded
    from distrain.data.base import tensor_splits

    bunch = getattr(datasets, f"load_{name}")()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    classes = len(bunch.target_names)
    expected = tensor_splits(
        x, torch.tensor(bunch.target), val_fraction=0.2, seed=3, num_outputs=classes
    )
    splits = getattr(embedded, name)(val_fraction=0.2, seed=3)

    assert splits.num_outputs == classes and splits.input_shape == expected.input_shape
    for ours, theirs in zip(
        splits.train.tensors + splits.val.tensors, expected.train.tensors + expected.val.tensors
    ):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_shared_splits_give_the_same_tensors_back_and_refuse_what_numpy_lacks():
    from distrain.data.base import SharedSplits, Splits, tensor_splits

    x, y = torch.randn(50, 3), torch.arange(50) % 4
    splits = tensor_splits(x, y, val_fraction=0.2, seed=1, num_outputs=4)
    opened = SharedSplits.of(splits).open()
    assert (opened.input_shape, opened.num_outputs, opened.task) == ((3,), 4, "classification")
    for ours, theirs in zip(
        opened.train.tensors + opened.val.tensors, splits.train.tensors + splits.val.tensors
    ):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    as_bf16 = tensor_splits(x.bfloat16(), y, val_fraction=0.2, seed=1, num_outputs=4)
    assert SharedSplits.of(as_bf16) is None  # numpy has no bfloat16: each worker builds it
    subset = torch.utils.data.Subset(splits.train, range(10))  # read item by item
    by_item = Splits(train=subset, val=subset, input_shape=(3,), num_outputs=4)
    assert SharedSplits.of(by_item) is None
