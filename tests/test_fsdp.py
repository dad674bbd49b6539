"""aggregator=fsdp against single-process training, its memory, resume across strategies and
worker counts, compile, activation checkpointing and export.

The MLP runs mirror test_equivalence (a [32, 32] MLP on digits, SGD with momentum, 30 steps) at a
global batch of 48, which splits over 1, 2 and 3 workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from benchmarks.small_job import small_job
from distrain import checkpoint, driver
from distrain.data.sklearn import digits
from distrain.rundir import RunDirectory
from distrain.sharding import epoch_permutation
from tests.conftest import compose_job, distrain_cli
from tests.test_cli import scalars
from tests.test_equivalence import LR, SEED, assert_same_parameters

STEPS, BATCH = 30, 48  # 29 steps per epoch: 30 cross an epoch boundary
MLP_PARAMS = (64 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10)  # 3,466
BASE = small_job(steps=STEPS, batch=BATCH, lr=LR, seed=SEED)
FSDP = "aggregator=fsdp"
CLIP = 0.5  # trainer.max_grad_norm: below most of the 30 steps' gradient norms


def plain_loop(
    steps: int = STEPS, max_grad_norm: float | None = None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Single-process training on the same data order; the final parameters and step losses.
    The gradient is clipped to `max_grad_norm` when given."""
    x, y = digits(val_fraction=0.2, seed=SEED).train.tensors
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        perm = epoch_permutation(len(x), SEED, epoch)
        for k in range(len(x) // BATCH):
            idx = perm[k * BATCH : (k + 1) * BATCH]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    return model.state_dict(), losses


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    return plain_loop()


def run(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    run_dir = RunDirectory(tmp_path / "_".join(overrides).replace("/", "-")[:200])
    metrics = driver.train(compose_job(*BASE, *overrides), run_dir, keep_workers=True)
    return metrics, torch.load(run_dir.model_path, weights_only=True)


def state_bytes(stats: dict[str, Any]) -> int:
    return stats["parameter_bytes"] + stats["gradient_bytes"] + stats["optimizer_state_bytes"]


@pytest.mark.slow
def test_fsdp_on_1_2_3_workers_matches_single_process_and_shards_memory(
    ray_address: str, tmp_path: Path, reference: tuple
) -> None:
    params, _ = reference
    one, one_params = run(tmp_path, FSDP, "trainer.workers=1")
    # Gradient clipping on DTensor shards: torch's clip_grad_norm_ reduces the norm across ranks.
    two, two_params = run(tmp_path, FSDP, "trainer.workers=2", f"trainer.max_grad_norm={CLIP}")
    clipped, _ = plain_loop(max_grad_norm=CLIP)
    assert max((clipped[k] - params[k]).abs().max().item() for k in params) > 1e-2
    assert_same_parameters(two_params, clipped)
    # 3 workers, 2 accumulated micro-batches each (no reduce-scatter on the first), and
    # evaluations inside the epochs: every rank runs each sharded forward in step.
    three, three_params = run(
        tmp_path,
        FSDP,
        "trainer.workers=3",
        "data.micro_batch_size=8",
        "trainer.eval_every_n_steps=10",
    )
    assert one["steps"] == two["steps"] == three["steps"] == STEPS
    assert_same_parameters(one_params, params)
    assert_same_parameters(three_params, params)
    # SGD+momentum: parameters, gradients and one momentum buffer, 4 bytes each.
    full = state_bytes(one["aggregator"][0])
    assert full == 3 * 4 * MLP_PARAMS
    for metrics, workers in ((two, 2), (three, 3)):
        shares = [state_bytes(s) for s in metrics["aggregator"]]
        assert sum(shares) == full  # every element on exactly one worker
        # Each tensor is split by rows; a tensor whose rows do not divide costs one row more.
        assert max(shares) <= full / workers * 1.05, (workers, shares, full)
    assert all(s["peak_memory_mb"] > 0 for s in two["aggregator"])


@pytest.mark.slow
def test_fsdp_bf16_with_cpu_offload_converges_and_reports_memory(
    ray_address: str, tmp_path: Path
) -> None:
    metrics, _ = run(
        tmp_path,
        FSDP,
        "trainer.workers=2",
        "trainer.precision=bf16",
        "aggregator.cpu_offload=true",
        "trainer.max_steps=58",
        "logger.histogram_every_n_steps=20",  # rank 0 alone reads its shards: no collective
    )
    series = scalars(Path(metrics["run_dir"]))
    events = EventAccumulator(metrics["run_dir"], size_guidance={"histograms": 0})
    events.Reload()
    assert "weights/1.weight" in events.Tags()["histograms"]
    losses = [value for _, value in series["loss/train"]]  # every 10 steps
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["val_accuracy"] > 0.8
    # Each worker's memory is in TensorBoard too, as in metrics.json.
    for rank, stats in enumerate(metrics["aggregator"]):
        [(_, value)] = series[f"memory/parameter_bytes/rank{rank}"]
        assert value == stats["parameter_bytes"] == 4 * MLP_PARAMS / 2


def _resume(tmp_path: Path, first: list[str], second: list[str]) -> dict[str, torch.Tensor]:
    """15 steps under `first`, then the same run resumed to step 30 under `second`."""
    run_dir = RunDirectory(tmp_path / "first")
    driver.train(compose_job(*BASE, "trainer.max_steps=15", *first), run_dir, keep_workers=True)
    # Each worker wrote its own shard, and they divide the state: no rank held all of it.
    latest = checkpoint.CheckpointStore(run_dir.checkpoints, keep=3).latest()
    sizes = [shard.stat().st_size for shard in sorted(latest.glob("shard-*.safetensors"))]
    assert len(sizes) == 2 and max(sizes) < 0.65 * sum(sizes), sizes  # ZeRO-1: uneven
    resumed = RunDirectory(tmp_path / "second")
    job = compose_job(*BASE, f"resume={run_dir.path}", *second)
    metrics = driver.train(job, resumed, keep_workers=True)
    assert metrics["steps"] == STEPS
    return torch.load(resumed.model_path, weights_only=True)


# AdamW in nanoGPT's two groups (biases exempt from decay): the optimizer state is stored by
# position in the groups, and FSDP restores it by parameter name, so the two orders must agree.
ADAM = ["optimizer=adamw", "optimizer.weight_decay=0.5", "optimizer.decay_norms_and_biases=false"]
ZERO = "trainer.shard_optimizer=true"


@pytest.fixture(scope="module")
def adam_reference(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Adam's moments and step counts must travel in the checkpoint: the uninterrupted run."""
    return run(tmp_path_factory.mktemp("adam"), "trainer.workers=1", *ADAM)[1]


CHECKPOINTED = "trainer.activation_checkpointing=blocks"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([FSDP, "trainer.workers=2", *ADAM], ["trainer.workers=1", *ADAM]),
        (["trainer.workers=2"], [FSDP, "trainer.workers=3", CHECKPOINTED]),
        (["trainer.workers=2", *ADAM, ZERO], [FSDP, "trainer.workers=3", *ADAM]),
        ([FSDP, "trainer.workers=2", *ADAM], ["trainer.workers=3", *ADAM, ZERO]),
    ],
    ids=[
        "fsdp2-to-ddp1-adam",
        "ddp2-to-fsdp3-checkpointed",
        "zero2-to-fsdp3-adam",
        "fsdp2-to-zero3-adam",
    ],
)
def test_resume_across_strategies_equals_the_uninterrupted_run(
    ray_address: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    first: list[str],
    second: list[str],
) -> None:
    final = _resume(tmp_path, first, second)
    adam = ADAM[0] in first
    expected = request.getfixturevalue("adam_reference" if adam else "reference")
    assert_same_parameters(final, expected if adam else expected[0])


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["allreduce", "fsdp"])
def test_compile_follows_the_eager_loss_curve(
    ray_address: str, tmp_path: Path, reference: tuple, aggregator: str
) -> None:
    steps = 6
    metrics, final = run(
        tmp_path,
        f"aggregator={aggregator}",
        "trainer.workers=2",
        "trainer.compile=true",
        f"trainer.max_steps={steps}",
        "logger.log_every_n_steps=1",
    )
    params, losses = plain_loop(steps)
    assert_same_parameters(final, params)
    assert all(s["compile_s"] is not None and s["compile_s"] > 0 for s in metrics["aggregator"])
    events = _step_losses(metrics["run_dir"])
    torch.testing.assert_close(events, losses, rtol=1e-4, atol=1e-5)


def _step_losses(run_dir: str) -> list[float]:
    return [value for _, value in scalars(Path(run_dir))["loss/train"]]


def test_export_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run directory as distrain leaves it -> safetensors + JSON -> the same outputs."""
    job = compose_job("model.hidden_sizes=[16,8]")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(job), run_dir / ".hydra" / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps({"input_shape": [8, 8], "num_outputs": 10}))
    torch.manual_seed(0)
    model = instantiate(job["model"], input_shape=(8, 8), num_outputs=10)
    torch.save(model.state_dict(), run_dir / "model.pt")

    out = tmp_path / "out" / "m.safetensors"
    assert distrain_cli(monkeypatch, "export", str(run_dir), "--out", str(out)) == 0
    config = json.loads(out.with_suffix(".json").read_text())
    fresh = instantiate(config["model"])  # the sizes the run took from the data are recorded
    fresh.load_state_dict(load_file(out))
    x = torch.randn(5, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_export_names_a_run_without_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert distrain_cli(monkeypatch, "export", str(tmp_path)) == 2
    assert "has no model.pt" in capsys.readouterr().err
