"""The typed schema of a job, registered in Hydra's ConfigStore.

Types and unknown keys are caught by Hydra when it merges `conf/` and the command-line overrides
into these dataclasses. Value checks (positive counts, an lr above zero) live in
distrain/validation.py, which the CLI calls once before any actor starts; whether the batch
splits over the workers is checked where it is computed, in distrain/plan.py.
Groups a user swaps for their own code (model, data, optimizer, scheduler, loss, aggregator) are
`_target_` dicts, left open so a user class can take any arguments; `typed()` then splits the
data group into its typed batching (`BatchingConfig`) and the builder's source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from distrain import config_errors

# Defined with the other errors; the modules that check a job import it from here.
from distrain.errors import ConfigError


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
    # Stop (at the next checkpoint boundary) once this many evaluations in a row have not
    # lowered the best val loss (None: never); distrain/early_stopping.py.
    early_stopping_patience: int | None = None
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
    # Healing without a ready spare: the survivors train on as a smaller group (the same global
    # batch, each worker standing for whole configured ranks and their random streams) while the
    # replacements start, and the group grows back after a step once they are ready. Bitwise
    # equal to the uninterrupted run on 2 workers without accumulation; otherwise equal up to
    # the order of float sums. false: the survivors wait for the replacements (bitwise always).
    train_while_replacing: bool = True
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
    # Embedded Ray only: worker processes forked from one that has imported torch and distrain
    # while Ray started, instead of each importing them (distrain/forked_workers.py).
    fork_workers: bool = True
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
    # torch.profiler on every rank: this many training steps after the first
    # `profile_after_step`, each rank's trace in <run dir>/profile/ (0: off; distrain/profiling.py).
    profile_steps: int = 0
    profile_after_step: int = 5


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
        """From the plain data group (checked by `validation.validate`)."""
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
    try:
        job_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), job))
    except (ConfigAttributeError, ConfigKeyError, ValidationError) as error:  # e.g. +trainer.x=1
        raise ConfigError(config_errors.explain(error) or str(error)) from None
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
