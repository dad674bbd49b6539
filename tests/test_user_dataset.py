"""The README's recipe for your own dataset, through the real CLI: `data=dataset
data.train._target_=my_package.MyDataset`, trained by 2 workers on the session's Ray; and its
mistakes, which end the run before any connection (an unreachable Ray address proves it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distrain import driver
from distrain.rundir import RunDirectory
from tests.conftest import compose_job, run_cli


@pytest.mark.slow
def test_a_user_dataset_by_target_trains_through_the_cli(ray_address: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "data=dataset",
        "data.train._target_=tests.userdata.Clusters",
        "+data.train.num_samples=320",
        # A user's transform from config, applied per sample in the DataLoader.
        "data.train_transforms=[{_target_:tests.userdata.AddOffset,offset:0.5}]",
        "data.val_transforms=[{_target_:tests.userdata.AddOffset,offset:0.5}]",
        "data.batch_size=32",
        "model.hidden_sizes=[16]",
        "trainer.epochs=3",
        "trainer.workers=2",
        f"cluster.address={ray_address}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["steps"] == 3 * (256 // 32)  # 64 of 320 are val
    assert metrics["val_accuracy"] >= 0.9, metrics  # three well-separated clusters
    state = torch.load(run_dir / "model.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight")]
    assert weights[0].shape == (16, 8) and weights[-1].shape == (3, 16)  # inferred shape, classes
    log = result.stdout + result.stderr
    assert "3 output(s) from reading every target (320 samples)" in log


BAD_INPUT = {
    "not a Dataset": (
        ["data.train._target_=tests.userdata.NotADataset"],
        "data.train built NotADataset (tests.userdata.NotADataset), not a map-style "
        "torch.utils.data.Dataset",
    ),
    "no dataset named": ([], "data.train._target_ has no value"),
    "unknown transform": (
        [
            "data.train._target_=tests.userdata.Clusters",
            "data.train_transforms=[{_target_:tests.userdata.AddOfset,offset:1}]",
        ],
        "has no 'AddOfset' (did you mean tests.userdata.AddOffset?)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_user_data_fails_before_any_actor(case: str, tmp_path: Path) -> None:
    overrides, message = BAD_INPUT[case]
    result = run_cli(
        "data=dataset",
        *overrides,
        "cluster.address=127.0.0.1:9",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout_s=90,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "unreachable" not in result.stderr


@pytest.mark.slow  # a whole run through the CLI
def test_in_memory_data_is_built_once_and_sent_to_the_workers(ray_address: str, tmp_path: Path):
    """In-memory data reaches the workers from the driver's check (the object store, once per
    node): only this process builds it. A dataset read item by item is built by every worker."""
    base = ["trainer.workers=2", "trainer.epochs=1", "model.hidden_sizes=[16]"]
    in_memory, by_item = tmp_path / "in_memory_builds", tmp_path / "by_item_builds"
    job = compose_job(*base, "data.batch_size=32", "logger.progress=none")
    job["data"] = {
        "_target_": "tests.userdata.counted_in_memory_clusters",
        "builds_file": str(in_memory),
        **{key: job["data"][key] for key in ("batch_size", "micro_batch_size", "loader")},
        "num_workers": 0,
    }
    metrics = driver.train(job, RunDirectory(tmp_path / "in_memory"), keep_workers=True)
    assert metrics["steps"] == 192 // 32 and metrics["val_accuracy"] > 0.5
    assert in_memory.read_text().split() == [str(os.getpid())]  # the check, on the driver

    job = compose_job(
        *base,
        "data=dataset",
        "data.train._target_=tests.userdata.CountedClusters",
        f"+data.train.builds_file={by_item}",
        "data.batch_size=32",
        "logger.progress=none",
    )
    driver.train(job, RunDirectory(tmp_path / "by_item"), keep_workers=True)  # the same workers
    builders = by_item.read_text().split()
    assert builders[0] == str(os.getpid()) and len(set(builders[1:])) == 2, builders
