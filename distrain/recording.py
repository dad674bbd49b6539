"""What the driver records of a run: TensorBoard, the terminal view, stragglers, the summary.

Only the driver writes TensorBoard. Records drained from the workers' sink arrive here as metrics
(`metrics.MetricsCollector`); a restart opens a new event file so steps logged again after the
checkpoint replace the old ones.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from distrain import build, checkpoint, standby
from distrain.config import Config, LoggerConfig
from distrain.data.base import Splits
from distrain.group import WorkerGroup
from distrain.metrics import (
    EpochMetrics,
    EvalMetrics,
    HistogramMetrics,
    MetricsCollector,
    SampleMetrics,
)
from distrain.plan import StepPlan
from distrain.progress import make_progress
from distrain.records import ProfileRecord, RankResult
from distrain.rundir import RunDirectory
from distrain.stragglers import StragglerDetector
from distrain.tensorboard_writer import TensorBoardWriter, hparams_of


class RunRecorder:
    """The run's TensorBoard writer, progress view and straggler detector, fed by the driver."""

    def __init__(self, run_dir: RunDirectory, progress_mode: str) -> None:
        self.run_dir = run_dir
        self.progress = make_progress(progress_mode)
        self.tensorboard: TensorBoardWriter | None = None
        self.detector: StragglerDetector | None = None
        self.stragglers: list[dict[str, Any]] = []  # each one reported, as metrics.json keeps it

    def open(
        self,
        job: Config,
        splits: Splits,
        overrides: list[str],
        resume: checkpoint.Checkpoint | None,
        plan: StepPlan,
    ) -> None:
        """Start the event file (after `resume`'s step on resume) and the progress view."""
        purge_step = resume.step + 1 if resume else None
        self.tensorboard = TensorBoardWriter(self.run_dir.path, purge_step=purge_step)
        if resume is None:
            self.tensorboard.add_text("config", f"```\n{OmegaConf.to_yaml(job)}\n```")
            if job.logger.log_graph:
                model = build.build_model(job.model, splits)
                self.tensorboard.add_graph(model, splits.train[0][0][None])
        else:
            self.progress.message(f"resuming from {resume.path} (step {resume.step})")
        self.tensorboard.start_session(hparams_of(job, overrides))
        self.progress.start(plan.total_steps, plan.epochs, plan.steps_per_epoch)

    def watch_group(self, group: WorkerGroup, logger: LoggerConfig) -> None:
        """A new group's ranks, for straggler detection (a rank is named with its node)."""
        self.detector = StragglerDetector(
            [n["node_ip"] for n in group.nodes],
            threshold=logger.straggler_threshold,
            patience=logger.straggler_patience,
        )

    def record(self, metrics: Any) -> None:
        """One figure from the collector (step, epoch, evaluation, histograms, samples) to where
        it goes."""
        assert self.tensorboard is not None and self.detector is not None
        if metrics is None:
            return
        if isinstance(metrics, EpochMetrics):
            self.tensorboard.log_epoch(metrics)
            self.progress.epoch(metrics)
        elif isinstance(metrics, EvalMetrics):
            self.tensorboard.log_evaluation(metrics)
            self.progress.evaluation(metrics)
        elif isinstance(metrics, HistogramMetrics):
            self.tensorboard.log_histograms(metrics)
        elif isinstance(metrics, SampleMetrics):
            self.tensorboard.log_samples(metrics)
        elif isinstance(metrics, ProfileRecord):
            self.write_profile(metrics)
        else:
            straggler = self.detector.update(metrics)
            self.tensorboard.log_step(metrics, straggler_rank=self.detector.flagged)
            self.progress.step(metrics)
            if straggler is not None:
                self.progress.message(straggler.message)
                self.tensorboard.log_straggler(straggler)
                self.stragglers.append(straggler.as_dict())

    def record_incomplete(self, figures: EpochMetrics | EvalMetrics) -> None:
        """An epoch or an evaluation completed from the ranks that reported it, said so."""
        what = (
            f"epoch {figures.epoch + 1}"
            if isinstance(figures, EpochMetrics)
            else f"the evaluation at step {figures.step}"
        )
        self.message(
            f"{what}: rank(s) {figures.missing_ranks} died before reporting it; its figures are "
            "the other ranks' only"
        )
        self.record(figures)

    def write_profile(self, profile: ProfileRecord) -> None:
        """A rank's trace into <run dir>/profile/ (said with rank 0's). Named by its steps too: a
        worker that replaced one (a heal, a restart) records its own window, beside the first."""
        directory = self.run_dir.path / "profile"
        directory.mkdir(exist_ok=True)
        steps = f"{profile.first_step}-{profile.last_step}"
        path = directory / f"rank{profile.rank}-steps{steps}.pt.trace.json.gz"
        path.write_bytes(profile.trace_gz)
        if profile.rank == 0:
            self.message(
                f"profile of steps {steps}: {path} (every rank's "
                "in that directory; open in https://ui.perfetto.dev)"
            )

    def write_workers(self, group: WorkerGroup) -> None:
        """workers.json: each rank's node, pid and actor, the spares ready to replace one, and
        the workers starting to grow the group back (their warm-up seconds once ready)."""
        spares = (
            {"spares": standby.ready_s(group.spares)} if group.job.trainer.spare_workers else {}
        )
        if group.joining:
            spares["joining"] = {joiner.name: joiner.ready_s for joiner in group.joining}
        self.run_dir.write_json(
            self.run_dir.path / "workers.json",
            {"workers": group.describe(), "started": group.started, **spares},
        )

    def message(self, text: str) -> None:
        self.progress.message(text)

    def restarted(
        self, restarts: int, step: int, failure: BaseException, how: str = "restart"
    ) -> None:
        """A restart from the checkpoint of `step` (or a group healed at `step`): a new event
        file, so the steps after it, logged again, replace the old; the failure as text and a
        count."""
        assert self.tensorboard is not None
        self.tensorboard.reopen(purge_step=step + 1)
        self.tensorboard.add_text("faults", f"{how} {restarts} at step {step}: {failure}", step)
        self.tensorboard.add_scalar("faults/restarts", restarts, step)

    def finish(self, result: dict[str, Any], wall_s: float) -> None:
        """The run's final figures into the HParams session."""
        assert self.tensorboard is not None
        self.tensorboard.end_session({**result, "wall_s": wall_s})

    def close(self) -> None:
        self.progress.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def summary(
        self,
        group: WorkerGroup,
        results: list[RankResult],
        *,
        task: str,
        history: list[EpochMetrics],
        failures: list[dict[str, Any]],
        checkpoints: dict[str, Any],
    ) -> dict[str, Any]:
        """The run's figures for metrics.json, from every rank's `fit` result."""
        rank0 = next(r for r in results if r.rank == 0)
        figures = MetricsCollector(group.world_size, task, history).summary()
        return {
            **figures,
            "steps": rank0.steps,
            "workers": group.world_size,
            "nodes": [n["node_id"] for n in group.nodes],
            "startup_s": group.startup_s,
            "workers_started": group.started,
            "skipped_steps": rank0.skipped_steps,
            "stragglers": self.stragglers,
            # Each rank's aggregator counters (bytes sent, staleness, optimizer-state bytes, ...).
            "aggregator": [r.aggregator for r in sorted(results, key=lambda r: r.rank)],
            "restarts": len(failures),
            "checkpoints": checkpoints,
            "failures": failures,
        }
