"""TensorBoard event files in the run directory; written by the driver only.

Tags are grouped into sections by their prefix (README "Watching training" lists them). Per
iteration tags use the global step as x; per epoch tags (`epoch/...`) use the epoch, from 1.
Every evaluation (epoch ends, and inside epochs under trainer.eval_every_n_steps) is also under
`val/...` on the step axis.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from distrain.config import Config, plain
from distrain.metrics import (
    EpochMetrics,
    EvalMetrics,
    HistogramMetrics,
    SampleMetrics,
    StepMetrics,
)
from distrain.stragglers import Straggler
from distrain.timing import PHASES

log = logging.getLogger("distrain")

# The HParams dashboard's metric columns: the last value of each series in the run. The same
# list in every run, so the sessions of a sweep share one table.
HPARAM_METRICS = (
    "epoch/val_loss",
    "epoch/val_accuracy",
    "epoch/val_top5_accuracy",
    "epoch/train_loss",
    "summary/best_val_accuracy",
    "summary/samples_per_s",
    "summary/wall_s",
)

MEMORY_KEYS = (
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "peak_memory_mb",
    "compile_s",
)


class TensorBoardWriter:
    """Per-iteration scalars on the global-step axis, per-epoch scalars on the epoch axis."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.log_dir = log_dir
        # purge_step: on resume, points logged at or after it by the interrupted run are dropped
        # when TensorBoard reads the directory, so the resumed run appends without duplicates.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self._layout_ranks: set[int] = set()
        self._session_open = False

    def reopen(self, purge_step: int) -> None:
        """A new event file after a restart from the checkpoint of step `purge_step - 1`; the
        HParams session stays open (the run goes on)."""
        self.writer.close()
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._layout_ranks = set()

    def log_step(self, metrics: StepMetrics, straggler_rank: int | None = None) -> None:
        values = {
            "loss/train": metrics.loss,
            "optim/lr": metrics.lr,
            "optim/grad_norm": metrics.grad_norm,
            "throughput/samples_per_s": metrics.samples_per_s,
            "time/step_s": metrics.step_s,
            **{f"time/{phase}": metrics.phases_s[phase] for phase in PHASES},
            "workers/slowest_to_fastest": metrics.slowest_to_fastest,
            "workers/straggler_rank": -1 if straggler_rank is None else straggler_rank,
        }
        if metrics.tokens_per_s is not None:
            values["throughput/tokens_per_s"] = metrics.tokens_per_s
        if metrics.mfu is not None:
            values["throughput/mfu"] = metrics.mfu
        for rank, worker in metrics.workers.items():
            if worker.tokens_per_s is not None:
                values[f"workers/rank{rank}/tokens_per_s"] = worker.tokens_per_s
            if worker.mfu is not None:
                values[f"workers/rank{rank}/mfu"] = worker.mfu
            values[f"workers/rank{rank}/samples_per_s"] = worker.samples_per_s
            values[f"workers/rank{rank}/step_s"] = worker.busy_s
            if worker.cpu_wait_s is not None:
                values[f"workers/rank{rank}/cpu_wait_s"] = worker.cpu_wait_s
            for phase in PHASES:
                values[f"workers/rank{rank}/{phase}"] = worker.phases_s[phase]
        skipped = max(r.skipped_steps for r in metrics.per_rank.values())
        if skipped:
            values["faults/skipped_steps"] = skipped
        self._add_scalars(values, metrics.step)
        if set(metrics.workers) != self._layout_ranks:
            cpu_wait = any(w.cpu_wait_s is not None for w in metrics.workers.values())
            self._add_worker_layout(sorted(metrics.workers), cpu_wait=cpu_wait)

    def _add_scalars(self, values: dict[str, float], step: int) -> None:
        """All of a step's scalars in one event: the driver shares the CPUs with the workers, and
        35 `add_scalar` calls cost ~1.5 ms of CPU per record against ~0.3 ms for one event."""
        summary = Summary(
            value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
        )
        self.writer.file_writer.add_summary(summary, step)

    def _add_worker_layout(self, ranks: list[int], *, cpu_wait: bool) -> None:
        """Custom Scalars: each per-worker figure with one line per rank on one chart (the wait
        for a CPU core only where it is measured: not on GPUs, no empty chart)."""
        self._layout_ranks = set(ranks)
        names = ("step_s", "samples_per_s", *PHASES, *(("cpu_wait_s",) if cpu_wait else ()))
        charts = {name: ["Multiline", [f"workers/rank{r}/{name}" for r in ranks]] for name in names}
        self.writer.add_custom_scalars({"workers (one line per rank)": charts})

    def log_epoch(self, metrics: EpochMetrics) -> None:
        epoch, add = metrics.epoch + 1, self.writer.add_scalar  # from 1, like the progress bar
        add("epoch/train_loss", metrics.train_loss, epoch)
        add("epoch/val_loss", metrics.val_loss, epoch)
        if metrics.val_accuracy is not None:
            add("epoch/val_accuracy", metrics.val_accuracy, epoch)
        if metrics.val_top5_accuracy is not None:
            add("epoch/val_top5_accuracy", metrics.val_top5_accuracy, epoch)
        add("epoch/train_s", metrics.train_s, epoch)
        add("epoch/eval_s", metrics.eval_s, epoch)
        add("epoch/samples_per_s", metrics.samples_per_s, epoch)
        if metrics.tokens:  # a language model
            add("epoch/val_perplexity", metrics.val_perplexity, epoch)
            add("epoch/tokens_per_s", metrics.tokens_per_s, epoch)
        if metrics.mfu is not None:
            add("epoch/mfu", metrics.mfu, epoch)
        if metrics.val_bits_per_byte is not None:
            add("epoch/val_bits_per_byte", metrics.val_bits_per_byte, epoch)
        self.log_evaluation(metrics.evaluation())

    def log_evaluation(self, metrics: EvalMetrics) -> None:
        """An evaluation on the step axis: `val/...`, from epoch ends and inside epochs."""
        values = {
            "val/loss": metrics.val_loss,
            "val/accuracy": metrics.val_accuracy,
            "val/top5_accuracy": metrics.val_top5_accuracy,
            "val/perplexity": metrics.val_perplexity,
            "val/bits_per_byte": metrics.val_bits_per_byte,
        }
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, metrics.step)
        self.writer.flush()

    def log_samples(self, metrics: SampleMetrics) -> None:
        """Generated text in the Text tab; indented, so markdown shows it verbatim."""
        text = "\n\n".join("    " + line.replace("\n", "\n    ") for line in metrics.text)
        self.writer.add_text("samples", text, metrics.step)
        self.writer.flush()

    def log_histograms(self, metrics: HistogramMetrics) -> None:
        for tag, h in metrics.histograms.items():
            self.writer.add_histogram_raw(tag, global_step=metrics.step, **h)

    def log_straggler(self, straggler: Straggler) -> None:
        self.writer.add_text("workers/stragglers", straggler.message, straggler.step)
        self.writer.flush()

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        self.writer.add_text(tag, text, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model graph once, traced on CPU; a model that cannot be traced is only logged."""
        try:
            with warnings.catch_warnings():  # torch.jit.trace's deprecation notice, every run
                warnings.simplefilter("ignore", FutureWarning)
                self.writer.add_graph(model.eval(), example)
        except Exception as error:  # tracing is best effort: a graph never fails a run
            log.warning("logger.log_graph: could not trace the model: %s", error)

    def start_session(self, hparams: dict[str, Any]) -> None:
        """HParams: the experiment (columns) and this run's values, in this run's directory.

        `SummaryWriter.add_hparams` would write them to a new sub-run; writing the summaries
        here keeps the session, its scalars and its metrics in one run.
        """
        metrics = dict.fromkeys(HPARAM_METRICS, 0.0)
        experiment, start, _ = hparams_summaries(hparams, metrics)
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self._session_open = True

    def end_session(self, summary: dict[str, Any], *, failed: bool = False) -> None:
        """Final figures as `summary/...` scalars (HParams reads them), then the session's end."""
        if not self._session_open:
            return
        step = summary.get("epochs", 0)
        keys = ("best_val_accuracy", "best_val_loss", "samples_per_s", "wall_s")
        for key in (*keys, "tokens_per_s", "mfu", "val_bits_per_byte"):
            if isinstance(summary.get(key), int | float):
                self.writer.add_scalar(f"summary/{key}", summary[key], step)
        # Each worker's memory (aggregators/base.py stats): compare strategies from one directory.
        for rank, stats in enumerate(summary.get("aggregator", [])):
            for key in MEMORY_KEYS:
                if isinstance(stats.get(key), int | float):
                    self.writer.add_scalar(f"memory/{key}/rank{rank}", stats[key], step)
        _, _, end = hparams_summaries({}, {})
        if failed:
            value = end.value[0]
            content = plugin_data_pb2.HParamsPluginData.FromString(
                value.metadata.plugin_data.content
            )
            content.session_end_info.status = api_pb2.STATUS_FAILURE
            value.metadata.plugin_data.content = content.SerializeToString()
        self.writer.file_writer.add_summary(end)
        self._session_open = False

    def close(self) -> None:
        self.end_session({}, failed=True)  # no-op after a successful end_session
        self.writer.close()


def hparams_of(job: Config, overrides: list[str]) -> dict[str, Any]:
    """The run's overrides (as resolved values) and key config values, as HParams columns."""

    def target(group: dict[str, Any]) -> str:
        return str(group.get("_target_", "")).rsplit(".", 1)[-1]

    values: dict[str, Any] = {
        "model": target(job.model),
        "data": target(job.data.source),
        "optimizer": target(job.optimizer),
        "optimizer.lr": job.optimizer.get("lr"),  # a user's optimizer may have none
        "data.batch_size": job.data.batching.batch_size,
        "trainer.workers": job.trainer.workers,
        "trainer.epochs": job.trainer.epochs,
        "trainer.precision": job.trainer.precision,
        "trainer.max_grad_norm": job.trainer.max_grad_norm,  # shown only when set
        "aggregator": target(job.aggregator),
        "aggregator.compression": job.aggregator.get("compression"),
    }
    # An override names any key, a user's builder argument included: looked up by its name.
    plain_job = plain(job)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "cluster.address")):
            continue  # where it ran, not what it trained
        values[key] = _lookup(plain_job, key, default=override.split("=", 1)[-1])
    return {k: _hparam_value(v) for k, v in values.items() if v is not None}


def _lookup(job: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = job
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    # A group choice (`optimizer=adam`) resolves to a dict: show the class it chose.
    if isinstance(node, dict):
        return str(node.get("_target_", default)).rsplit(".", 1)[-1]
    return node


def _hparam_value(value: Any) -> Any:
    """HParams takes numbers, strings and booleans; anything else is shown as text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | str):
        return value
    return str(value)
