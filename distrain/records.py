"""What a worker reports to the driver: one typed record per kind.

The loop and the worker make them; they travel worker → `MetricsSink` actor → supervisor (pickled
by Ray, in batches); the supervisor hands step and epoch records to `MetricsCollector`, which
turns every rank's record of one step or epoch into the global figures, checkpoint records to
`Checkpoints`, and counts every record as a sign of life. Records are frozen; `rank` is stamped
by the worker as it queues one (`Worker._report`), so the loop need not know its rank. Workers
report sums and counts, not means, so that the driver's totals are exact over any number of
workers and uneven shards. The answers of two worker calls live here too: `RankResult`
(`Worker.fit`) and `StandDown` (a survivor's position when healing).

This module imports no torch: the sink and the supervisor's tests read it without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NO_RANK = -1  # a record not yet queued by its worker


@dataclass(frozen=True)
class Throughput:
    """A language model's tokens and model FLOPs in the samples a record covers."""

    tokens: int
    flops: float
    peak_flops_per_s: float  # the worker's device peak; 0.0: unknown (no MFU then)


@dataclass(frozen=True)
class StepRecord:
    """One rank's logging interval: the steps since its previous StepRecord."""

    step: int  # the interval's last step
    epoch: int
    loss: float  # mean over the interval's steps whose loss was finite
    lr: float
    grad_norm: float  # of the averaged gradient, at the interval's last step
    samples: int  # trained by this rank in the interval
    steps: int
    interval_s: float  # the interval's wall time on this rank
    skipped_steps: int  # non-finite steps skipped so far (trainer.nan_policy=skip_step)
    phases_s: dict[str, float]  # seconds in each phase of distrain/timing.py, summed
    throughput: Throughput | None = None
    cpu_wait_s: float | None = None  # busy phases' wait for a CPU core, summed (timing.py)
    rank: int = NO_RANK


@dataclass(frozen=True)
class ValidationSums:
    """One rank's validation shard, summed (distrain/evaluation.py)."""

    loss_sum: float  # per sample, or per token for a language model
    correct: int  # top-1 (classification; 0 otherwise)
    count: int  # samples, or tokens for a language model
    correct_top5: int | None = None  # classification with more than 5 classes
    bytes: float | None = None  # a language model whose bytes per token are known


@dataclass(frozen=True)
class EpochRecord:
    """One rank's epoch: its training sums and its validation shard's."""

    epoch: int
    step: int
    train_loss_sum: float
    train_batches: int  # whose loss was finite
    samples: int  # trained by this rank in this session of the epoch
    train_s: float
    eval_s: float
    validation: ValidationSums
    throughput: Throughput | None = None
    rank: int = NO_RANK


@dataclass(frozen=True)
class EvalRecord:
    """One rank's validation shard at a step inside an epoch (trainer.eval_every_n_steps)."""

    step: int
    epoch: int
    eval_s: float
    validation: ValidationSums
    rank: int = NO_RANK


@dataclass(frozen=True)
class CheckpointRecord:
    """One rank's share of a checkpoint: its header and its tensors in the object store."""

    step: int
    epoch_end: bool  # written once the epoch's figures are in (`Checkpoints.epoch_recorded`)
    header: dict[str, Any]  # distrain/training_state.py's header of this rank's share
    share: list[Any]  # [ObjectRef of the wire-format tensors]
    rank: int = NO_RANK


@dataclass(frozen=True)
class Heartbeat:
    """A rank is alive: between logged steps, or waiting for peers that have not arrived."""

    step: int | None = None
    waiting_for: list[int] | None = None  # ranks a collective waits for (shared memory)
    rank: int = NO_RANK


@dataclass(frozen=True)
class SampleRecord:
    """Rank 0's continuations of the fixed prompt at an epoch's end (language models)."""

    step: int
    epoch: int
    text: list[str]
    rank: int = NO_RANK


@dataclass(frozen=True)
class HistogramRecord:
    """Rank 0's weight and gradient histograms at a step (logger.histogram_every_n_steps)."""

    step: int
    histograms: dict[str, dict[str, Any]]  # tag -> fields of distrain/histograms.py
    rank: int = NO_RANK


@dataclass(frozen=True)
class ProfileRecord:
    """One rank's profile of a few training steps (logger.profile_steps; distrain/profiling.py)."""

    first_step: int
    last_step: int
    trace_gz: bytes  # Chrome trace-event JSON, gzipped
    rank: int = NO_RANK


@dataclass
class RankResult:
    """What a rank's `fit` returns: it finished its steps, or stopped at a boundary."""

    rank: int
    steps: int  # the last completed step
    stopped: bool  # at a boundary (Ctrl-C, SIGTERM, growing back), before the last step
    skipped_steps: int
    aggregator: dict[str, Any]  # the strategy's counters (bytes sent, staleness, ...)
    state_dict: dict[str, Any] | None = None  # rank 0: the final model, on the CPU


@dataclass(frozen=True)
class StandDown:
    """A survivor after a peer failed (distrain/healing.py): where it stands."""

    rank: int
    step: int  # its last completed step
    epoch_loss_sum: float  # its share of the epoch's loss so far
    epoch_batches: int


Record = (
    StepRecord
    | EpochRecord
    | EvalRecord
    | CheckpointRecord
    | Heartbeat
    | SampleRecord
    | HistogramRecord
    | ProfileRecord
)
