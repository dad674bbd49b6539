"""`data=dataset`: a user's map-style Dataset, what is inferred from it, and its mistakes.

The datasets are tests/userdata.py's classes, named by `_target_` through the real config (or
passed as objects, as a Python caller would); the errors come from the driver's real dry build.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from distrain import build, preflight
from distrain.config import ConfigError, DataConfig, typed
from distrain.data import dataset as user_data
from distrain.data.batches import ShardBatches
from distrain.data.dataset import user_dataset
from distrain.sharding import ShardSampler
from tests.conftest import compose_job
from tests.userdata import Clusters, NamedClusters, Waves

CPU = torch.device("cpu")


def _job(*overrides: str) -> dict:
    return compose_job("data=dataset", "data.batch_size=16", *overrides)


def test_a_dataset_by_target_infers_task_classes_and_shape(caplog) -> None:
    job = _job("data.train._target_=tests.userdata.Clusters", "+data.train.num_samples=50")
    with caplog.at_level(logging.INFO, logger="distrain"):
        splits = build.build_splits(DataConfig.of(job["data"]))
    assert splits.task == "classification" and splits.num_outputs == 3
    assert splits.input_shape == (8,) and not splits.in_memory
    assert len(splits.train) == 40 and len(splits.val) == 10  # round(50 * 0.2)
    x, y = splits.train[0]
    assert x.shape == (8,) and y.dtype == torch.long and y.dim() == 0
    # The log says what was inferred, and from what.
    assert "classification from training sample 0's target" in caplog.text
    assert "3 output(s) from reading every target (50 samples)" in caplog.text
    assert "input shape (8,), measured on training sample 0" in caplog.text


def test_classes_attribute_wins_over_the_labels_seen() -> None:
    # Labels 0..2 only, but the dataset declares 5 classes: a sample cannot know that.
    splits = user_dataset(NamedClusters(num_samples=30))
    assert splits.num_outputs == 5


def test_targets_attribute_counts_classes_without_reading_samples() -> None:
    class Targeted(Dataset):
        def __init__(self) -> None:
            self.targets = [0, 6, 2]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int):
            if index:  # only sample 0 may be read: the count comes from `targets`
                raise AssertionError("read a sample to count classes")
            return torch.zeros(2), self.targets[index]

    splits = user_dataset(Targeted(), val=Targeted())
    assert splits.num_outputs == 7


def test_too_large_to_scan_asks_for_num_outputs(monkeypatch) -> None:
    monkeypatch.setattr(user_data, "SCAN_LIMIT", 10)
    with pytest.raises(
        ConfigError, match=re.escape("set data.num_outputs to the number of classes")
    ):
        user_dataset(Clusters(num_samples=20))
    assert user_dataset(Clusters(num_samples=20), num_outputs=4).num_outputs == 4


def test_regression_targets_become_float_vectors() -> None:
    splits = user_dataset(Waves(num_samples=20))
    assert splits.task == "regression" and splits.num_outputs == 2
    _, y = splits.train[0]
    assert y.dtype == torch.float32 and y.shape == (2,)

    scalar = TensorDataset(torch.randn(10, 3), torch.randn(10, dtype=torch.float64))
    splits = user_dataset(scalar)
    _, y = splits.train[0]
    # (1,), not (): a batch of targets is (B, 1) like the model's output, so MSE does not broadcast.
    assert splits.num_outputs == 1 and y.shape == (1,) and y.dtype == torch.float32


def test_overrides_take_precedence() -> None:
    splits = user_dataset(
        Waves(num_samples=20), task="regression", num_outputs=2, input_shape=[2, 2]
    )
    assert splits.input_shape == (2, 2) and splits.num_outputs == 2
    integer_targets = TensorDataset(torch.randn(10, 3), torch.arange(10) % 2)
    as_regression = user_dataset(integer_targets, task="regression")
    assert as_regression.task == "regression" and as_regression.train[0][1].dtype == torch.float32
    with pytest.raises(ConfigError, match="a class index is one whole number per sample"):
        user_dataset(Waves(num_samples=20), task="classification")
    with pytest.raises(ConfigError, match=re.escape("data.task='ranking' is not one of")):
        user_dataset(integer_targets, task="ranking")


def test_val_fraction_split_is_deterministic_by_seed() -> None:
    def val_inputs(seed: int) -> torch.Tensor:
        splits = user_dataset(Clusters(num_samples=40), val_fraction=0.25, seed=seed)
        return torch.stack([splits.val[i][0] for i in range(len(splits.val))])

    assert len(val_inputs(0)) == 10
    torch.testing.assert_close(val_inputs(0), val_inputs(0), rtol=0, atol=0)
    assert not torch.equal(val_inputs(0), val_inputs(1))
    with pytest.raises(ConfigError, match=re.escape("data.val_fraction=1.5 must be in")):
        user_dataset(Clusters(), val_fraction=1.5)


def test_separate_val_dataset_by_target() -> None:
    job = _job(
        "data.train._target_=tests.userdata.Clusters",
        "data.val={_target_:tests.userdata.Clusters,num_samples:12,seed:1}",
    )
    splits = build.build_splits(DataConfig.of(job["data"]))
    assert len(splits.train) == 256 and len(splits.val) == 12


def test_batched_by_the_dataloader_with_the_same_sharding() -> None:
    job = _job("data.train._target_=tests.userdata.Clusters", "+data.train.num_samples=64")
    splits = build.build_splits(DataConfig.of(job["data"]))
    batches = ShardBatches(
        splits, global_batch=8, rank=1, world_size=2, seed=0, device=CPU, num_workers=0
    )
    assert not batches.in_memory
    expected = next(ShardSampler(len(splits.train), 8, 1, 2, seed=0).local_indices(0))
    x, y = next(iter(batches.train_batches(epoch=0)))
    torch.testing.assert_close(x, torch.stack([splits.train[int(i)][0] for i in expected]))
    torch.testing.assert_close(y, torch.stack([splits.train[int(i)][1] for i in expected]))


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


BAD = {
    "unknown class": (["data.train._target_=tests.userdata.Nope"], "data.train._target_="),
    "not a Dataset": (
        ["data.train._target_=tests.userdata.NotADataset"],
        "data.train built NotADataset (tests.userdata.NotADataset), not a map-style",
    ),
    "empty": (["data.train._target_=tests.userdata.Empty"], "is empty (len 0)"),
    "not (x, y)": (
        ["data.train._target_=tests.userdata.Dicts"],
        "is a dict with keys ['x', 'y']; distrain needs (input, target) pairs",
    ),
    "bad argument": (
        ["data.train._target_=tests.userdata.Clusters", "+data.train.colour=red"],
        "unexpected keyword argument 'colour'",
    ),
    "empty val": (
        ["data.train._target_=tests.userdata.Clusters", "data.val={_target_:tests.userdata.Empty}"],
        "data.val (Empty) is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_datasets_are_one_config_error_at_the_dry_build(case: str) -> None:
    overrides, message = BAD[case]
    with pytest.raises(ConfigError) as info:
        preflight.dry_build(typed(_job(*overrides)))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not str(info.value).startswith("data: ConfigError")  # not wrapped twice


def test_bad_targets_and_iterable_datasets() -> None:
    with pytest.raises(ConfigError, match="an IterableDataset"):
        user_dataset(_Stream())
    words = [(torch.zeros(2), "cat")] * 4
    with pytest.raises(ConfigError, match="is 'cat' \\(str\\): targets must be a class index"):
        user_dataset(_List(words))
    vectors = TensorDataset(torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match=re.escape("set data.task=regression for vector targets")):
        user_dataset(vectors)


class _List(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]
