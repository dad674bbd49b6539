"""`data.train_transforms` / `data.val_transforms`: the defaults reproduce the transforms that
were built into the dataset builders, a user's transform is applied where it should be, and bad
entries are one ConfigError at the driver's dry build.

CIFAR-10 and the image folder are tiny files in the real formats (tests/fakedata.py), read by
torchvision's real loaders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distrain import build, preflight
from distrain.config import ConfigError, DataConfig, typed
from distrain.data.batches import ShardBatches
from distrain.data.vision import RandomCropFlip, cifar10
from distrain.sharding import ShardSampler
from tests.conftest import compose_job
from tests.fakedata import write_cifar

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_batch=8, num_test=8)  # 40 training images
    return root


def _cifar_job(root: Path, *overrides: str) -> dict:
    return compose_job(
        "data=cifar10",
        f"data.root={root}",
        "data.check_integrity=false",
        "model.hidden_sizes=[16]",  # small: the test compares parameters, not accuracy
        *overrides,
    )


def _train(job: dict, splits, epochs: int = 2) -> dict[str, torch.Tensor]:
    """What a worker does with these splits (1 worker, global batch 8), seeded as it seeds."""
    batches = ShardBatches(splits, global_batch=8, rank=0, world_size=1, seed=0, device=CPU)
    torch.manual_seed(0)
    model = build.build_model(job["model"], splits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        for x, y in batches.train_batches(epoch):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_default_cifar_transforms_train_exactly_as_the_built_in_augmentation(cifar_root) -> None:
    job = _cifar_job(cifar_root)
    configured = build.build_splits(DataConfig.of(job["data"]))
    # Before transforms were config, cifar10(augment=True, crop_padding=4) set exactly this.
    hard_wired = cifar10(root=str(cifar_root), check_integrity=False)
    hard_wired.train_transform = RandomCropFlip(padding=4, flip=True)
    assert configured.val_transform is None and hard_wired.val_transform is None

    ours, before = _train(job, configured), _train(job, hard_wired)
    for key in ours:
        torch.testing.assert_close(ours[key], before[key], rtol=0, atol=0)
    # ... and the augmentation did something: without it the parameters differ.
    plain_job = _cifar_job(cifar_root, "data.train_transforms=[]")
    plain = _train(plain_job, build.build_splits(DataConfig.of(plain_job["data"])))
    assert any(not torch.equal(ours[key], plain[key]) for key in ours)


def test_default_image_folder_transforms_equal_the_built_in_pipeline(tmp_path) -> None:
    from torchvision import transforms as v1

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):  # noisy images of different sizes: resizing really interpolates
            pixels = rng.integers(0, 256, size=(9 + 5 * i, 14 + 3 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    job = compose_job("data=image_folder", f"data.root={tmp_path}", "data.image_size=16")
    splits = build.build_splits(DataConfig.of(job["data"]))
    assert splits.input_shape == (3, 16, 16)
    mean, std = job["data"]["mean"], job["data"]["std"]
    old = v1.Compose([v1.Resize((16, 16)), v1.ToTensor(), v1.Normalize(mean, std)])
    for dataset in (splits.train, splits.val):
        for i in range(len(dataset)):
            image, label = dataset.dataset[i]  # the PIL image under the per-sample transforms
            x, y = dataset[i]
            assert y == label
            torch.testing.assert_close(x, old(image), rtol=0, atol=0)


def test_a_user_transform_runs_per_batch_on_in_memory_data() -> None:
    job = compose_job(
        "data=digits",
        "data.train_transforms=[{_target_:tests.userdata.AddOffset,offset:100}]",
        "data.val_transforms=[{_target_:tests.userdata.AddOffset,offset:-5}]",
    )
    splits = build.build_splits(DataConfig.of(job["data"]))
    assert splits.in_memory and splits.input_shape == (64,)
    batches = ShardBatches(splits, global_batch=8, rank=1, world_size=2, seed=0, device=CPU)
    raw_x = splits.train.tensors[0]
    indices = next(ShardSampler(len(splits.train), 8, 1, 2, seed=0).local_indices(0))
    x, _ = next(iter(batches.train_batches(epoch=0)))
    torch.testing.assert_close(x, raw_x[indices] + 100)
    val_x, _ = next(iter(batches.val_batches()))
    start = batches.val_indices.start
    torch.testing.assert_close(val_x, splits.val.tensors[0][start : start + len(val_x)] - 5)


def test_a_user_transform_runs_per_sample_in_dataloader_workers() -> None:
    job = compose_job(
        "data=dataset",
        "data.train._target_=tests.userdata.Clusters",
        "+data.train.num_samples=32",
        "data.train_transforms=[{_target_:tests.userdata.AddOffset,offset:100}]",
    )
    splits = build.build_splits(DataConfig.of(job["data"]))
    raw = splits.train.dataset  # the user's items before the transforms
    # num_workers=1: __getitem__, and so the transform, runs in a DataLoader worker process.
    batches = ShardBatches(
        splits, global_batch=8, rank=0, world_size=1, seed=0, device=CPU, num_workers=1
    )
    indices = next(ShardSampler(len(splits.train), 8, 0, 1, seed=0).local_indices(0))
    x, _ = next(iter(batches.train_batches(epoch=0)))
    torch.testing.assert_close(x, torch.stack([raw[int(i)][0] for i in indices]) + 100)
    val_x, _ = splits.val[0]  # no val_transforms: validation inputs are untouched
    assert val_x.abs().max() < 50


def test_cifar_crop_flip_per_sample_through_the_dataloader(cifar_root) -> None:
    job = _cifar_job(cifar_root, "data.loader=dataloader")
    splits = build.build_splits(DataConfig.of(job["data"]))
    assert not splits.in_memory and splits.train_transform is None
    x, _ = splits.train[0]
    assert x.shape == (3, 32, 32) and splits.input_shape == (3, 32, 32)


BAD = {
    "unknown transform": (
        ["data.train_transforms=[{_target_:torchvision.transforms.v2.RandomErasng}]"],
        "data.train_transforms[0]._target_='torchvision.transforms.v2.RandomErasng' does not "
        "exist: module 'torchvision.transforms.v2' has no 'RandomErasng' (did you mean "
        "torchvision.transforms.v2.RandomErasing",
    ),
    "unknown module": (
        ["data.val_transforms=[{_target_:my_missing_pkg.Flip}]"],
        "data.val_transforms[0]._target_='my_missing_pkg.Flip' does not import: No module named",
    ),
    "missing argument": (
        ["data.train_transforms=[{_target_:torchvision.transforms.v2.RandomCrop}]"],
        "data.train_transforms[0]: torchvision.transforms.v2.RandomCrop could not be built with {}",
    ),
    "not a list": (["data.train_transforms=5"], "data.train_transforms=5 is not a list"),
    "entry without target": (["data.train_transforms=[flip]"], "data.train_transforms[0]='flip'"),
    "fails on the data": (
        [
            "data.train_transforms=[{_target_:torchvision.transforms.v2.Normalize,mean:[0,0,0],std:[1,1,1]}]"
        ],
        "data.train_transforms[0] (Normalize(mean=[0, 0, 0], std=[1, 1, 1], inplace=False)) "
        "failed on a batch of training sample 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_transforms_are_one_config_error_at_the_dry_build(case: str) -> None:
    overrides, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        preflight.dry_build(typed(compose_job("data=digits", *overrides)))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not str(info.value).startswith("data: ConfigError")  # not wrapped twice


def test_in_memory_transforms_must_keep_the_shape(cifar_root) -> None:
    crop = "data.train_transforms=[{_target_:torchvision.transforms.v2.CenterCrop,size:24}]"
    with pytest.raises(ConfigError, match=re.escape("from (3, 32, 32) to (3, 24, 24)")):
        build.build_splits(DataConfig.of(_cifar_job(cifar_root, crop)["data"]))
    # Per sample (data.loader=dataloader) the crop makes the input shape: val must match it.
    with pytest.raises(ConfigError, match="training inputs have shape"):
        build.build_splits(
            DataConfig.of(_cifar_job(cifar_root, crop, "data.loader=dataloader")["data"])
        )
    both = crop.replace("train_transforms", "val_transforms")
    splits = build.build_splits(
        DataConfig.of(_cifar_job(cifar_root, crop, both, "data.loader=dataloader")["data"])
    )
    assert splits.input_shape == (3, 24, 24) and splits.train[0][0].shape == (3, 24, 24)


def test_images_without_a_to_tensor_transform_are_refused(tmp_path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    job = compose_job(
        "data=image_folder",
        f"data.root={tmp_path}",
        "data.train_transforms=[]",
        "data.val_transforms=[]",
    )
    with pytest.raises(
        ConfigError, match=re.escape("is a PIL.Image.Image; the model needs a tensor")
    ):
        build.build_splits(DataConfig.of(job["data"]))
