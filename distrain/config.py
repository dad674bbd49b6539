"""The typed schema of a job, registered in Hydra's ConfigStore, and the checks Hydra cannot make.

Types and unknown keys are caught by Hydra when it merges `conf/` and the command-line overrides
into these dataclasses. Value checks (positive counts, an lr above zero) live in `validate()`,
which the driver calls once before any actor starts; whether the batch splits over the workers
is checked where it is computed, in distrain/plan.py.
Groups a user swaps for their own code (model, data, optimizer, scheduler, loss, aggregator) are
`_target_` dicts, left open so a user class can take any arguments; `typed()` then splits the
data group into its typed batching (`BatchingConfig`) and the builder's source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from distrain.errors import ConfigError  # defined with the other errors; imported from here


class Device(str, Enum):
    auto = "auto"  # GPUs when the cluster has them, else CPUs
    cpu = "cpu"
    cuda = "cuda"


class Placement(str, Enum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_SPREAD = "STRICT_SPREAD"
    STRICT_PACK = "STRICT_PACK"


# Choices are enums: Hydra refuses any other value at composition, naming the allowed ones. A
# `str` mix-in, so a value compares equal to its name wherever the job travels as plain values.
class NanPolicy(str, Enum):
    stop = "stop"  # a NaN/inf loss or gradient ends the run, naming the step
    skip_step = "skip_step"  # the step is skipped (no update) and counted


class ActivationCheckpointing(str, Enum):
    none = "none"
    blocks = "blocks"  # recompute each repeated block's activations in backward


class Progress(str, Enum):
    auto = "auto"  # rich on a TTY, plain lines otherwise
    rich = "rich"
    plain = "plain"
    none = "none"


class Loader(str, Enum):
    auto = "auto"  # memory when the builder returns in-memory tensors, else dataloader
    memory = "memory"  # tensors on the device, batched by indexing a permutation
    dataloader = "dataloader"  # torch's DataLoader, data.num_workers processes per worker


PRECISIONS = ("32", "bf16", "16")
LR_SCALINGS = ("none", "linear")  # optimizer.lr_scaling (read by build.build_optimizer)


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
    checkpoint_every_n_steps: int | None = None  # also at the end of every epoch (None: only then)
    # Also evaluate every this many steps inside an epoch (None: at epoch ends only), for epochs
    # too long to wait for: a language model's token stream is often one epoch.
    eval_every_n_steps: int | None = None
    # Scheduled checkpoints (the two above) are skipped while the last is younger than this;
    # the run's last one and a stop's are always taken. 0: take every one.
    checkpoint_min_interval_s: float = 0.0
    keep_checkpoints: int = 3
    keep_best_checkpoint: bool = True  # also keep the one of the lowest val loss (`best` pointer)
    # True: a step waits only while its state is copied to host memory (Ray's object store) and
    # the driver writes it in the background; false: the step waits until it is on disk.
    async_checkpoint: bool = True
    max_failures: int = 3  # worker/node losses recovered (healed or restarted) before giving up
    min_workers: int | None = None  # elastic: continue on fewer workers (>= this) if nodes are lost
    # A dead or hung worker is replaced while the others keep their processes and state in
    # memory (distrain/healing.py); false, or where healing does not apply: every worker restarts
    # from the last checkpoint.
    heal: bool = True
    # Workers started beside the group, torch imported and data mapped: one takes a failed rank's
    # place without a start-up (and is itself replaced in the background).
    spare_workers: int = 0
    nan_policy: NanPolicy = NanPolicy.stop  # what a NaN/inf loss or gradient does
    # Gradient clipping: the averaged gradient is scaled down, before the optimizer step, so its
    # global L2 norm (over every parameter of the model, on every worker) is at most this.
    # None: no clipping. The logged `optim/grad_norm` is the norm before clipping.
    max_grad_norm: float | None = None
    stop_timeout_s: float = 60.0  # Ctrl-C: how long to wait for the workers' final checkpoint
    shard_optimizer: bool = False  # ZeRO stage 1: each worker keeps 1/W of the optimizer state
    # CUDA only: TF32 matmuls/convolutions under precision=32 (None: on for compute capability
    # >= 8, i.e. Ampere and newer; decided in distrain/device.py). cudnn.benchmark is always on.
    tf32: bool | None = None
    # CUDA only: the GPU share Ray reserves per worker. Below 1, workers share a GPU (tests, small
    # models); their collectives then go over gloo with CUDA tensors, since NCCL refuses two ranks
    # on one GPU.
    gpus_per_worker: float = 1.0
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    compile: bool = False  # torch.compile the model (per block under aggregator=fsdp)
    # MFU's peak per worker device in TFLOP/s (None: a GPU's from distrain/mfu.py's table, a
    # CPU's measured by one matmul at start-up).
    peak_tflops: float | None = None


@dataclass
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; or auto | host:6379 | ray://host:10001
    num_cpus: int | None = None  # embedded Ray only: logical CPUs (None: detect)
    num_gpus: int | None = None  # embedded Ray only: GPUs (None: detect)
    placement: Placement = Placement.PACK
    connect_timeout_s: float = 15.0
    socket_ifname: str | None = None  # sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in workers
    runtime_env_working_dir: bool = False  # ship the project dir to the cluster with the job
    scale_up_timeout_s: float = 600.0  # wait this long for an autoscaler to add nodes


@dataclass
class LoggerConfig:
    log_every_n_steps: int = 10  # per-iteration scalars and progress updates
    progress: Progress = Progress.auto
    histogram_every_n_steps: int = 0  # weight/gradient histograms (0: off)
    log_graph: bool = False  # the model graph once (traced on the driver's CPU copy)
    # A worker whose compute time per step stays above the others' median by this factor for
    # `straggler_patience` consecutive logged intervals is reported as a straggler.
    straggler_threshold: float = 1.3
    straggler_patience: int = 3
    # Language models: at each evaluation rank 0 continues the validation file's first
    # `sample_prompt_tokens` tokens `sample_count` times by `sample_tokens` tokens (0: off),
    # shown in TensorBoard's text tab.
    sample_tokens: int = 200
    sample_count: int = 2
    sample_prompt_tokens: int = 32
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40


# The data group's batching keys but its main one (`batch_size`, which each conf/data/*.yaml
# sets for its dataset), with their defaults: in the schema, so no data config repeats them
# and they still take a plain `data.loader=...` override.
BATCHING_DEFAULTS: dict[str, Any] = {"micro_batch_size": None, "loader": "auto", "num_workers": 0}
BATCHING_KEYS = ("batch_size", *BATCHING_DEFAULTS)


@dataclass(frozen=True)
class BatchingConfig:
    """How the data is batched (distrain/plan.py splits the global batch over the workers)."""

    batch_size: int  # global: samples per optimizer step over all workers
    micro_batch_size: int | None = None  # per worker, for gradient accumulation (None: none)
    loader: Loader = Loader.auto
    num_workers: int = 0  # DataLoader processes per worker (the dataloader path only)


@dataclass(frozen=True)
class DataConfig:
    """The data group, typed (`typed()`): its batching, and the source for `build.build_splits`
    (`_target_` with its arguments, and the transforms)."""

    batching: BatchingConfig
    source: dict[str, Any]

    @classmethod
    def of(cls, data: dict[str, Any]) -> DataConfig:
        """From the plain data group (checked by `validate`)."""
        merged = {**BATCHING_DEFAULTS, **data}
        batching = BatchingConfig(
            batch_size=merged["batch_size"],
            micro_batch_size=merged["micro_batch_size"],
            loader=Loader(merged["loader"]),
            num_workers=merged["num_workers"],
        )
        return cls(batching, {k: v for k, v in data.items() if k not in BATCHING_KEYS})

    def plain(self) -> dict[str, Any]:
        """The plain data group again, as the user wrote it."""
        batching = dataclasses.asdict(self.batching) | {"loader": self.batching.loader.value}
        return {**self.source, **batching}


@dataclass
class Config:
    model: Any = MISSING
    # Composed as a plain dict (a user's builder takes any arguments); `typed()` makes it a
    # DataConfig.
    data: Any = field(default_factory=lambda: dict(BATCHING_DEFAULTS))
    optimizer: Any = MISSING
    scheduler: Any = None
    loss: Any = MISSING
    aggregator: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resume: str | None = None  # a run dir or checkpoint file to continue from


def typed(job: dict[str, Any]) -> Config:
    """The resolved job as typed objects, once, at the top (`driver.train`): trainer, cluster and
    logger become their dataclasses (choices as enums), data a DataConfig; the groups a user may
    swap for their own code (model, optimizer, scheduler, loss, aggregator, and the data's
    source) stay `_target_` dicts for Hydra's instantiate."""
    job_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), job))
    job_config.data = DataConfig.of(job_config.data)
    return job_config


def plain(job: Config) -> dict[str, Any]:
    """The typed job as plain values again (enums as names), for records (TensorBoard's config
    text and HParams) and for the workers, which type it again."""
    values = OmegaConf.structured(dataclasses.replace(job, data=None))
    return OmegaConf.to_container(values, enum_to_str=True) | {"data": job.data.plain()}


def register_configs() -> None:
    """Make the schema available to `conf/config.yaml` as `distrain_schema`."""
    store = ConfigStore.instance()
    store.store(name="distrain_schema", node=Config)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(job: dict[str, Any]) -> None:
    """Check the values of a resolved job (plain dict); raise ConfigError naming the bad value."""
    _check_trainer(job["trainer"])
    _check_cluster(job["cluster"])
    _check_logger(job["logger"])
    _check_sampling(job["logger"], job["trainer"])
    _check_optimizer(job["optimizer"])
    for group in ("model", "data", "optimizer", "loss", "aggregator"):
        _require(
            isinstance(job[group], dict) and "_target_" in job[group],
            f"{group} has no _target_: every {group} config names the class or function to build "
            f"(e.g. {group}=<one of conf/{group}/*.yaml>).",
        )
    _check_batching(job["data"])


def _check_trainer(trainer: dict[str, Any]) -> None:
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
    gpus = trainer.get("gpus_per_worker", 1.0)
    _require(
        0 < gpus <= 1,
        f"trainer.gpus_per_worker={gpus} must be in (0, 1]: a worker uses one GPU; below 1, "
        "workers share one.",
    )
    for key in ("setup_timeout_s", "step_timeout_s", "stop_timeout_s"):
        _require(trainer[key] > 0, f"trainer.{key}={trainer[key]} must be > 0 seconds.")
    _require(
        trainer["checkpoint_min_interval_s"] >= 0,
        f"trainer.checkpoint_min_interval_s={trainer['checkpoint_min_interval_s']} must be >= 0 "
        "seconds (0: every scheduled checkpoint).",
    )
    evaluate = trainer["eval_every_n_steps"]
    _require(
        evaluate is None or evaluate >= 1,
        f"trainer.eval_every_n_steps={evaluate} must be >= 1, or null (epoch ends only).",
    )
    every = trainer["checkpoint_every_n_steps"]
    _require(
        every is None or every >= 1,
        f"trainer.checkpoint_every_n_steps={every} must be >= 1, or null (epoch ends only).",
    )
    _require(
        trainer["keep_checkpoints"] >= 1,
        f"trainer.keep_checkpoints={trainer['keep_checkpoints']} must be at least 1.",
    )
    _require(
        trainer["max_failures"] >= 0,
        f"trainer.max_failures={trainer['max_failures']} must be >= 0.",
    )
    clip = trainer["max_grad_norm"]
    _require(
        clip is None or (clip > 0 and math.isfinite(clip)),
        f"trainer.max_grad_norm={clip} must be a finite number > 0 (the largest L2 norm the "
        "averaged gradient keeps), or null (no clipping).",
    )
    spares = trainer.get("spare_workers", 0)
    _require(spares >= 0, f"trainer.spare_workers={spares} must be >= 0 (0: no spare).")
    low = trainer["min_workers"]
    _require(
        low is None or 1 <= low <= workers,
        f"trainer.min_workers={low} must be between 1 and trainer.workers={workers}, or null.",
    )


def _check_cluster(cluster: dict[str, Any]) -> None:
    for key in ("connect_timeout_s", "scale_up_timeout_s"):
        _require(cluster[key] > 0, f"cluster.{key}={cluster[key]} must be > 0 seconds.")


def _check_logger(logger: dict[str, Any]) -> None:
    _require(
        logger["log_every_n_steps"] >= 1,
        f"logger.log_every_n_steps={logger['log_every_n_steps']} must be at least 1.",
    )
    _require(
        logger["histogram_every_n_steps"] >= 0,
        f"logger.histogram_every_n_steps={logger['histogram_every_n_steps']} must be >= 0 "
        "(0 turns histograms off).",
    )
    _require(
        logger["straggler_threshold"] > 1,
        f"logger.straggler_threshold={logger['straggler_threshold']} must be > 1: it is how many "
        "times slower than the others a worker must be, e.g. 1.3.",
    )
    _require(
        logger["straggler_patience"] >= 1,
        f"logger.straggler_patience={logger['straggler_patience']} must be at least 1 "
        "(logged intervals in a row).",
    )


def _check_optimizer(optimizer: dict[str, Any]) -> None:
    lr = optimizer.get("lr")
    _require(
        lr is None or (isinstance(lr, int | float) and lr > 0),
        f"optimizer.lr={lr} is not allowed: the learning rate must be a number > 0.",
    )
    scaling = optimizer.get("lr_scaling", "none")
    _require(
        scaling in LR_SCALINGS,
        f"optimizer.lr_scaling={scaling!r} is not one of {', '.join(LR_SCALINGS)} (linear: lr x "
        "data.batch_size / optimizer.reference_batch).",
    )
    reference = optimizer.get("reference_batch", 256)
    _require(
        isinstance(reference, int) and not isinstance(reference, bool) and reference >= 1,
        f"optimizer.reference_batch={reference} must be a whole number of samples >= 1.",
    )
    _require(
        scaling == "none" or lr is not None,
        "optimizer.lr_scaling=linear scales optimizer.lr, but this optimizer has no lr key.",
    )
    decay = optimizer.get("decay_norms_and_biases", True)
    _require(
        isinstance(decay, bool),
        f"optimizer.decay_norms_and_biases={decay!r} must be true or false (false: parameters "
        "of fewer than 2 dimensions, such as biases and norm gains, get no weight decay).",
    )


def _check_batching(data: dict[str, Any]) -> None:
    batch_size = data.get("batch_size")
    _require(
        isinstance(batch_size, int) and batch_size >= 1,
        f"data.batch_size={batch_size} must be a whole number >= 1 (the global batch per step).",
    )
    micro = data.get("micro_batch_size")
    _require(
        micro is None or (isinstance(micro, int) and not isinstance(micro, bool) and micro >= 1),
        f"data.micro_batch_size={micro} must be a whole number >= 1 (samples per forward and "
        "backward on one worker), or null.",
    )
    # How the batch splits over the workers and micro-batches: distrain/plan.py, once the dry
    # build has counted the training samples.
    num_workers = data.get("num_workers", 0)
    _require(
        isinstance(num_workers, int) and num_workers >= 0,
        f"data.num_workers={num_workers} must be a whole number >= 0 (DataLoader processes).",
    )
    loader = data.get("loader", "auto")
    allowed = [choice.value for choice in Loader]
    _require(loader in allowed, f"data.loader={loader!r} is not one of {', '.join(allowed)}.")


def _check_sampling(logger: dict[str, Any], trainer: dict[str, Any]) -> None:
    for key in ("sample_tokens", "sample_count", "sample_prompt_tokens"):
        _require(logger[key] >= 0, f"logger.{key}={logger[key]} must be >= 0.")
    _require(
        logger["sample_count"] >= 1 and logger["sample_prompt_tokens"] >= 1,
        f"logger.sample_count={logger['sample_count']} and logger.sample_prompt_tokens="
        f"{logger['sample_prompt_tokens']} must be at least 1 (logger.sample_tokens=0 turns "
        "sampling off).",
    )
    _require(
        logger["sample_temperature"] > 0,
        f"logger.sample_temperature={logger['sample_temperature']} must be > 0.",
    )
    top_k = logger["sample_top_k"]
    _require(top_k is None or top_k >= 1, f"logger.sample_top_k={top_k} must be >= 1, or null.")
    peak = trainer["peak_tflops"]
    _require(peak is None or peak > 0, f"trainer.peak_tflops={peak} must be > 0, or null.")
