"""The typed schema of a job, registered in Hydra's ConfigStore, and the checks Hydra cannot make.

Types and unknown keys are caught by Hydra when it merges `conf/` and the command-line overrides
into these dataclasses. Value checks (positive counts, an lr above zero, a batch that splits over
the workers) live in `validate()`, which the driver calls once before any actor starts.
Groups a user swaps for their own code (model, data, optimizer, scheduler, loss, aggregator) are
`_target_` dicts, left open so a user class can take any arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING


class ConfigError(ValueError):
    """A user mistake in the configuration: printed as one paragraph, exit code 2."""


class Device(Enum):
    auto = "auto"  # GPUs when the cluster has them, else CPUs
    cpu = "cpu"
    cuda = "cuda"


class Placement(Enum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_SPREAD = "STRICT_SPREAD"
    STRICT_PACK = "STRICT_PACK"


PRECISIONS = ("32", "bf16", "16")


@dataclass
class TrainerConfig:
    workers: int = 2  # Ray actors, one device each
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    device: Device = Device.auto
    precision: str = "32"  # 32 | bf16 | 16 (autocast; fp16 adds a gradient scaler)
    seed: int = 0
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per worker; also its torch threads
    setup_timeout_s: float = 120.0  # building workers + process group rendezvous
    step_timeout_s: float = 300.0  # a worker silent for longer is declared hung
    shard_optimizer: bool = False  # ZeRO stage 1: each worker keeps 1/W of the optimizer state


@dataclass
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; or auto | host:6379 | ray://host:10001
    num_cpus: int | None = None  # embedded Ray only: logical CPUs (None: detect)
    num_gpus: int | None = None  # embedded Ray only: GPUs (None: detect)
    placement: Placement = Placement.PACK
    connect_timeout_s: float = 15.0
    socket_ifname: str | None = None  # sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in workers
    runtime_env_working_dir: bool = False  # ship the project dir to the cluster with the job


@dataclass
class LoggerConfig:
    log_every_n_steps: int = 10  # per-iteration scalars and progress updates
    progress: str = "auto"  # auto (rich on a TTY, plain lines otherwise) | rich | plain | none


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    loss: Any = MISSING
    aggregator: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Make the schema available to `conf/config.yaml` as `distrain_schema`."""
    store = ConfigStore.instance()
    store.store(name="distrain_schema", node=Config)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(job: dict[str, Any]) -> None:
    """Check the values of a resolved job (plain dict); raise ConfigError naming the bad value."""
    trainer, data, cluster, logger = job["trainer"], job["data"], job["cluster"], job["logger"]
    workers = trainer["workers"]
    _require(workers >= 1, f"trainer.workers={workers} is not allowed: it must be at least 1.")
    _require(trainer["epochs"] >= 1, f"trainer.epochs={trainer['epochs']} must be at least 1.")
    max_steps = trainer["max_steps"]
    _require(max_steps is None or max_steps >= 1, f"trainer.max_steps={max_steps} must be >= 1.")
    _require(
        trainer["precision"] in PRECISIONS,
        f"trainer.precision={trainer['precision']!r} is not one of {', '.join(PRECISIONS)}.",
    )
    _require(
        trainer["cpus_per_worker"] > 0,
        f"trainer.cpus_per_worker={trainer['cpus_per_worker']} must be > 0.",
    )
    for key in ("setup_timeout_s", "step_timeout_s"):
        _require(trainer[key] > 0, f"trainer.{key}={trainer[key]} must be > 0 seconds.")
    _require(
        logger["log_every_n_steps"] >= 1,
        f"logger.log_every_n_steps={logger['log_every_n_steps']} must be at least 1.",
    )
    _require(
        logger["progress"] in ("auto", "rich", "plain", "none"),
        f"logger.progress={logger['progress']!r} is not one of auto, rich, plain, none.",
    )
    _require(cluster["connect_timeout_s"] > 0, "cluster.connect_timeout_s must be > 0 seconds.")

    lr = job["optimizer"].get("lr")
    _require(
        lr is None or (isinstance(lr, int | float) and lr > 0),
        f"optimizer.lr={lr} is not allowed: the learning rate must be a number > 0.",
    )
    for key in ("_target_",):
        for group in ("model", "data", "optimizer", "loss", "aggregator"):
            _require(
                isinstance(job[group], dict) and key in job[group],
                f"{group} has no {key}: every {group} config names the class or function to build "
                f"(e.g. {group}=<one of conf/{group}/*.yaml>).",
            )

    batch_size = data.get("batch_size")
    _require(
        isinstance(batch_size, int) and batch_size >= 1,
        f"data.batch_size={batch_size} must be a whole number >= 1 (the global batch per step).",
    )
    _require(
        batch_size % workers == 0,
        f"data.batch_size={batch_size} (the global batch) cannot be split evenly over "
        f"trainer.workers={workers}: choose a batch size divisible by {workers}, "
        f"e.g. {max(workers, batch_size // workers * workers)} "
        f"or {(batch_size // workers + 1) * workers}.",
    )
    micro = data.get("micro_batch_size")
    per_worker = batch_size // workers
    _require(
        micro is None
        or (isinstance(micro, int) and 1 <= micro <= per_worker and per_worker % micro == 0),
        f"data.micro_batch_size={micro} must divide the per-worker batch "
        f"{per_worker} (= data.batch_size {batch_size} / trainer.workers {workers}), or be null.",
    )
    loader = data.get("loader", "auto")
    _require(
        loader in ("auto", "memory", "dataloader"),
        f"data.loader={loader!r} is not one of auto, memory, dataloader.",
    )
    _check_aggregator(job)


def _check_aggregator(job: dict[str, Any]) -> None:
    """Settings elsewhere in the job that the chosen aggregator cannot honour (its `check_job`).

    A `_target_` that does not import is left to the driver's dry build, which says why.
    """
    try:
        aggregator_cls = get_object(job["aggregator"]["_target_"])
    except Exception:
        return
    check = getattr(aggregator_cls, "check_job", None)
    if check is not None:
        check(job)
