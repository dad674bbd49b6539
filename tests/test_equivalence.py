"""The proof that gradients are really averaged: 1 worker, 2 workers and a plain PyTorch loop,
at the same seed, global batch and steps, end with the same parameters."""

import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.small_job import small_job
from distrain import driver
from distrain.data.sklearn import digits
from distrain.rundir import RunDirectory
from distrain.sharding import epoch_permutation
from tests.conftest import compose_job

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
STEPS, BATCH, LR, SEED = 30, 64, 0.05, 3  # 30 steps cross an epoch boundary (22 per epoch)
BASE = small_job(steps=STEPS, batch=BATCH, lr=LR, seed=SEED)


def sgd_momentum(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)  # conf/optimizer/sgd.yaml's momentum


def plain_pytorch_loop(
    make_optimizer: MakeOptimizer = sgd_momentum, max_grad_norm: float | None = None
) -> dict[str, torch.Tensor]:
    """Textbook single-process training on the same data order (one permutation per epoch),
    the gradient clipped to `max_grad_norm` when given."""
    splits = digits(val_fraction=0.2, seed=SEED)
    x, y = splits.train.tensors
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    optimizer = make_optimizer(model.parameters())
    step, epoch = 0, 0
    while step < STEPS:
        perm = epoch_permutation(len(x), SEED, epoch)
        for k in range(len(x) // BATCH):
            idx = perm[k * BATCH : (k + 1) * BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            step += 1
            if step == STEPS:
                break
        epoch += 1
    return model.state_dict()


def distrain_run(tmp_path: Path, *overrides: str) -> dict[str, torch.Tensor]:
    run_dir = RunDirectory(tmp_path / "_".join(overrides))
    metrics = driver.train(compose_job(*BASE, *overrides), run_dir, keep_workers=True)
    assert metrics["steps"] == STEPS
    return torch.load(run_dir.model_path, weights_only=True)


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_one_worker_two_workers_and_plain_pytorch_agree(ray_address: str, tmp_path: Path) -> None:
    reference = plain_pytorch_loop()
    one = distrain_run(tmp_path, "trainer.workers=1")
    # Evaluating inside the epochs (steps 7, 14, 21, 28) and profiling steps 6-8 must not change
    # what is trained.
    profiled = ["trainer.eval_every_n_steps=7", "logger.profile_steps=3"]
    two = distrain_run(tmp_path, "trainer.workers=2", *profiled)
    for rank in (0, 1):  # each rank's trace, written by the driver
        trace = tmp_path / "_".join(["trainer.workers=2", *profiled]) / "profile"
        trace_gz = (trace / f"rank{rank}-steps6-8.pt.trace.json.gz").read_bytes()
        events = json.loads(gzip.decompress(trace_gz))
        names = Counter(event.get("name") for event in events["traceEvents"])
        assert sorted(n for n in names if n.startswith("ProfilerStep#")) == [
            "ProfilerStep#5", "ProfilerStep#6", "ProfilerStep#7"
        ]  # fmt: skip
        # The averaging is in it: once a step (one bucket), through shared memory or gloo.
        assert names["shm:all_reduce"] + names["gloo:all_reduce"] == 3, names
        assert names["aten::addmm"] > 0 and names["Optimizer.step#SGD.step"] == 3
    # distrain's MLP is nn.Sequential too, so the keys line up one to one.
    assert_same_parameters(one, reference)
    assert_same_parameters(two, reference)
    # And training did move the parameters: the comparison is not of two initialisations.
    torch.manual_seed(SEED)
    initial = nn.Linear(64, 32).weight
    assert (two["1.weight"] - initial).abs().max() > 1e-3
