"""The CUDA-path fixes that can be checked on a CPU (issue 15): device choice and placement,
the torch floor, the sync-free index path, histograms on the device, the persistent loader."""

from __future__ import annotations

import ast
import re
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset, TensorDataset

from distrain import device as devices
from distrain.data.base import Splits
from distrain.data.batches import ShardBatches
from distrain.errors import is_transport_failure
from distrain.histograms import BINS, model_histograms
from distrain.metrics import MetricsCollector
from distrain.records import StepRecord
from distrain.sharding import ShardSampler
from distrain.step import grad_norm
from distrain.stragglers import StragglerDetector
from distrain.timing import EventClock, SinceEvent, StepClock, make_clock

ROOT = Path(__file__).resolve().parents[2]


# --- 10: device=auto -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "gpus", "workers", "autoscaler", "expected"),
    [
        ("auto", 0, 1, 0, "cpu"),
        ("auto", 1, 1, 0, "cuda"),
        ("auto", 1, 2, 0, "cpu"),  # one GPU cannot hold two workers: CPU, not a stuck wait
        ("auto", 4, 4, 0, "cuda"),
        ("auto", 0, 4, 8, "cuda"),  # an autoscaler may add the GPUs
        ("auto", 2, 4, 3, "cpu"),  # not even at its maximum
        ("cpu", 8, 2, 0, "cpu"),
        ("cuda", 0, 2, 0, "cuda"),  # explicit: the resource check then says what is missing
    ],
)
def test_choose_device_type(requested, gpus, workers, autoscaler, expected) -> None:
    assert devices.choose_device_type(requested, gpus, workers, autoscaler) == expected


# --- 4: every worker of a node sees the node's GPUs ------------------------------------------


def test_share_visible_devices_per_node() -> None:
    placements = [("a", ["3"]), ("a", ["1"]), ("b", ["0"]), ("a", ["10"]), ("b", ["2"])]
    out = devices.share_visible_devices(placements)
    assert [p.visible for p in out] == ["1,3,10", "1,3,10", "0,2", "1,3,10", "0,2"]
    assert [p.index for p in out] == [1, 0, 0, 2, 1]  # its own id's position in the list


def test_share_visible_devices_noset() -> None:
    """RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: nothing is set, the index follows the id."""
    placements = [("a", ["0"]), ("a", ["1"]), ("b", ["5"])]
    out = devices.share_visible_devices(placements, noset=True, process_visible=[None, None, "4,5"])
    assert [p.visible for p in out] == [None, None, None]
    assert [p.index for p in out] == [0, 1, 1]  # not cuda:0 on every rank


def test_cpu_worker_device_does_not_touch_cuda() -> None:
    assert devices.worker_device(devices.CPU) == torch.device("cpu")
    devices.configure_math(torch.device("cpu"), "bf16", None)  # no CUDA query on a CPU worker


# --- 1: the torch floor ----------------------------------------------------------------------


def test_grad_norm_matches_reference() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model(torch.randn(11, 7)).pow(2).sum().backward()

    class P:  # grad_norm reads .model and .scaler only
        scaler = torch.amp.GradScaler("cpu", enabled=False)

    P.model = model
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert grad_norm(P) == pytest.approx(expected, rel=1e-6)


# APIs newer than the declared floor (pyproject's "torch>=X"), with the release that added them.
NEWER_THAN_FLOOR = {
    "get_total_norm": "2.6",
    "clip_grads_with_norm_": "2.6",
    "torch.accelerator": "2.6",
    "fully_shard": "2.6 (as torch.distributed.fsdp.fully_shard)",
}


def _declared_torch_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"torch>=([0-9.]+)"', text)
    assert match, "pyproject.toml declares no torch floor"
    return match.group(1)


def test_no_api_newer_than_the_declared_torch_floor() -> None:
    floor = tuple(int(p) for p in _declared_torch_floor().split("."))
    used = []
    for path in [*ROOT.glob("distrain/**/*.py")]:
        source = ast.unparse(ast.parse(path.read_text()))  # code only, no comments
        for name, since in NEWER_THAN_FLOOR.items():
            added = tuple(int(p) for p in since.split()[0].split("."))
            if name in source and added > floor:
                used.append(f"{path.relative_to(ROOT)} uses {name} (torch {since})")
    assert not used, used


# --- 2: no host-to-device copy per step ------------------------------------------------------


class CopyCounter(TorchDispatchMode):
    """Counts copies that move a tensor to another device (what a per-step `.to()` costs)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out if isinstance(out, torch.Tensor) else args[0]
            if source.device != target.device:
                self.copies += 1
        return out


def _splits(n: int = 64) -> Splits:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n)
    return Splits(TensorDataset(x, y), TensorDataset(x[:8], y[:8]), (3,), n)


def test_in_memory_indices_reach_the_device_once_per_epoch() -> None:
    """On the meta device (a CUDA-free stand-in) every CPU->device copy is visible: the epoch's
    index table is the only one; the per-step indices are views of it."""
    batches = ShardBatches(
        _splits(), global_batch=8, rank=1, world_size=2, seed=0, device=torch.device("meta")
    )
    with CopyCounter() as counter:
        steps = list(batches.train_batches(epoch=0))
    assert len(steps) == batches.steps_per_epoch == 8
    assert counter.copies == 1  # the epoch's table (the old code made 2 per step: 16)
    assert all(x.device.type == "meta" and y.device.type == "meta" for x, y in steps)
    rows = list(batches.epoch_indices(epoch=0))
    bases = {row._base.untyped_storage()._cdata for row in rows}  # rows share one table
    assert all(row._base is not None for row in rows) and len(bases) == 1


def test_in_memory_batches_follow_the_sampler() -> None:
    splits = _splits()
    batches = ShardBatches(splits, global_batch=8, rank=1, world_size=2, seed=3, device=CPU)
    expected = list(ShardSampler(64, 8, 1, 2, seed=3).local_indices(2, start_step=5))
    got = list(batches.train_batches(epoch=2, start_step=5))
    assert len(got) == len(expected) == 3
    for (x, y), indices in zip(got, expected):
        assert torch.equal(y, indices) and torch.equal(x, splits.train.tensors[0][indices])
    assert list(batches.train_batches(epoch=0, start_step=8)) == []  # an epoch already done


# --- 9: the DataLoader is built once ---------------------------------------------------------


CPU = torch.device("cpu")


class Lazy(Dataset):
    """Not a TensorDataset, so ShardBatches goes through its DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), i


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_built_once_serves_every_epoch(num_workers: int) -> None:
    splits = Splits(Lazy(40), Lazy(6), (2,), 40)
    batches = ShardBatches(
        splits, global_batch=4, rank=0, world_size=2, seed=1, device=CPU, num_workers=num_workers
    )
    loader = batches.train_loader
    assert loader.persistent_workers == (num_workers > 0)
    sampler = ShardSampler(40, 4, 0, 2, seed=1)
    for epoch, start in [(0, 0), (1, 7), (2, 0)]:
        ys = [y for _, y in batches.train_batches(epoch, start)]
        expected = list(sampler.local_indices(epoch, start))
        assert [y.tolist() for y in ys] == [e.tolist() for e in expected]
        assert batches.train_loader is loader  # the same loader (and worker processes)
    # An epoch left early (max_steps, a checkpoint stop) does not disturb the next one.
    next(iter(batches.train_batches(3)))
    assert [y.tolist() for _, y in batches.train_batches(4)] == [
        e.tolist() for e in sampler.local_indices(4)
    ]
    assert [y.tolist() for _, y in batches.val_batches()] == [[0, 1, 2]]


# --- 8: histograms on the device -------------------------------------------------------------


def _reference_histogram(values: torch.Tensor) -> dict:
    """The implementation before issue 15 (whole tensor to the host)."""
    flat = values.detach().float().flatten().cpu()
    low, high = flat.min().item(), flat.max().item()
    if high <= low:
        high = low + 1e-12
    counts = torch.histc(flat, bins=BINS, min=low, max=high)
    return {
        "min": low,
        "max": high,
        "num": flat.numel(),
        "sum": flat.sum().item(),
        "sum_squares": flat.square().sum().item(),
        "bucket_limits": torch.linspace(low, high, BINS + 1)[1:].tolist(),
        "bucket_counts": counts.tolist(),
    }


def test_histograms_match_the_host_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    model[1].bias.data.fill_(0.5)  # a constant tensor: the one-bucket case
    model(torch.randn(9, 6)).sum().backward()
    got = model_histograms(model)
    expected = {}
    for name, p in model.named_parameters():
        expected[f"weights/{name}"] = _reference_histogram(p)
        expected[f"grads/{name}"] = _reference_histogram(p.grad)
    assert got == expected


def test_ranks_sharing_a_gpu_are_marked_shared() -> None:
    """trainer.gpus_per_worker < 1: Ray gives two ranks the same GPU id; they must use gloo."""
    out = devices.share_visible_devices([("a", ["0"]), ("a", ["0"]), ("a", ["1"]), ("b", ["0"])])
    assert [(p.visible, p.index, p.shared) for p in out] == [
        ("0,1", 0, True),
        ("0,1", 0, True),
        ("0,1", 1, False),
        ("0", 0, False),
    ]


# --- 3: GPU-time phases ----------------------------------------------------------------------


class TimelineEvent:
    """Stands in for torch.cuda.Event(enable_timing=True): `record` reads a GPU timeline that
    the test advances by hand (ms), so the clock's bookkeeping is checked exactly."""

    now_ms = 0.0

    def record(self) -> None:
        self.at_ms = TimelineEvent.now_ms

    def elapsed_time(self, end: TimelineEvent) -> float:
        return end.at_ms - self.at_ms

    def synchronize(self) -> None:
        pass


def _gpu_step(clock, *, data_ms, compute_ms, wait_ms, optimizer_ms) -> None:
    """One step as train_step times it; backward's wait follows the last bucket's launch."""
    TimelineEvent.now_ms += data_ms
    clock.lap("data_s")
    TimelineEvent.now_ms += compute_ms
    launch = TimelineEvent()
    launch.record()  # what CommTimer records when DDP launches the last bucket
    TimelineEvent.now_ms += wait_ms
    clock.lap("forward_backward_s")
    clock.lap("aggregation_wait_s")
    clock.shift("forward_backward_s", "aggregation_wait_s", SinceEvent(launch))
    TimelineEvent.now_ms += optimizer_ms
    clock.lap("optimizer_s")


def test_event_clock_splits_gpu_time_and_reuses_events() -> None:
    made = []

    def make() -> TimelineEvent:
        made.append(TimelineEvent())
        return made[-1]

    clock = EventClock(make)
    for _ in range(3):
        _gpu_step(clock, data_ms=1, compute_ms=10, wait_ms=40, optimizer_ms=2)
        TimelineEvent.now_ms += 100  # logging between steps: no phase's time
        clock.restart()
    totals = clock.pop()
    assert totals == pytest.approx(
        {
            "data_s": 0.003,
            "forward_backward_s": 0.030,
            "aggregation_wait_s": 0.120,
            "optimizer_s": 0.006,
        }
    )
    created = len(made)
    _gpu_step(clock, data_ms=1, compute_ms=10, wait_ms=0, optimizer_ms=2)
    assert len(made) == created  # the next interval records into recycled events
    assert clock.pop()["aggregation_wait_s"] == 0.0


def test_busy_time_finds_the_slow_gpu() -> None:
    """Synchronous steps: every rank's wall time is equal; on the fast rank the difference is
    backward's wait for the all-reduce, which must not count as busy (compute) time."""
    detector = StragglerDetector(["n0", "n1", "n2"], threshold=1.3, patience=2)
    found = None
    for interval in range(3):
        collector = MetricsCollector(3, "classification")
        for rank, compute_ms in enumerate([10, 10, 45]):  # rank 2 is the slow GPU
            clock = EventClock(TimelineEvent)
            for _ in range(4):
                _gpu_step(
                    clock, data_ms=1, compute_ms=compute_ms, wait_ms=50 - compute_ms, optimizer_ms=2
                )
            record = StepRecord(
                rank=rank,
                step=4 * (interval + 1),
                epoch=0,
                loss=1.0,
                lr=0.1,
                grad_norm=1.0,
                samples=32,
                steps=4,
                interval_s=0.212,
                skipped_steps=0,
                phases_s=clock.pop(),
            )
            metrics = collector.add(record)
        found = detector.update(metrics) or found
    assert found is not None and found.rank == 2
    assert found.ratio == pytest.approx(48 / 13)


def test_make_clock_on_cpu_is_the_host_clock() -> None:
    assert type(make_clock(CPU)) is StepClock


# --- 5: setup failures of the transport are retried -----------------------------------------


def _taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_store_bind_on_a_taken_port_is_a_transport_failure() -> None:
    """The port rank 0 picked is taken before its store binds it: a real DistNetworkError."""
    sock, port = _taken_port()
    with sock:
        with pytest.raises(RuntimeError) as store_error:
            torch.distributed.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=5))
        with socket.socket() as other, pytest.raises(OSError) as bind_error:
            other.bind(("127.0.0.1", port))
    assert isinstance(store_error.value, torch.distributed.DistError)
    assert is_transport_failure(store_error.value)
    assert is_transport_failure(bind_error.value)


def test_user_errors_are_not_transport_failures() -> None:
    with pytest.raises(RuntimeError) as shapes:
        torch.nn.Linear(3, 2)(torch.zeros(4, 5))
    with pytest.raises(ImportError) as missing:
        import distrain_no_such_module  # noqa: F401
    for error in (shapes.value, missing.value, ValueError("data.root does not exist")):
        assert not is_transport_failure(error)


@pytest.mark.parametrize("share", [0, 1.5])
def test_gpus_per_worker_outside_zero_one_is_a_config_error(share: float) -> None:
    from distrain.config import ConfigError
    from distrain.validation import validate
    from tests.conftest import compose_job

    with pytest.raises(ConfigError, match=r"trainer\.gpus_per_worker"):
        validate(compose_job(f"trainer.gpus_per_worker={share}"))
    validate(compose_job("trainer.gpus_per_worker=0.5", "trainer.tf32=true"))
