"""The driver: check the job, start a worker group, supervise it, record results.

It does not take part in training steps: workers run the loop (SPMD) and report to a sink that the
driver drains a few times a second into TensorBoard, the terminal, checkpoints and metrics.json.
When a worker dies, hangs or its node is lost, the supervisor tears the group down and starts a
new one from the last checkpoint (`trainer.max_failures` times), on fewer workers if the cluster
shrank and `trainer.min_workers` allows it.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from distrain import build, checkpoint, cluster, config, hangs
from distrain.checkpoint_writer import CheckpointWriter, Pending, ShareLost, ShareTimeout
from distrain.data.base import Splits
from distrain.device import choose_device_type, worker_gpus
from distrain.group import (
    GroupFailed,
    SetupTransportFailed,
    WorkerError,
    WorkerGroup,
    is_transport_failure,
)
from distrain.loop import NonFiniteError
from distrain.metrics import EpochMetrics, HistogramMetrics, MetricsCollector, SampleMetrics
from distrain.progress import make_progress
from distrain.rundir import RunDirectory, git_revision
from distrain.stragglers import StragglerDetector
from distrain.tensorboard_writer import TensorBoardWriter, hparams_of

log = logging.getLogger("distrain")
POLL_S = 0.25  # how often the driver drains metrics and checks on the workers
# Parts of the job a checkpoint must agree with to be resumed (the rest may change on resume).
RESUME_MUST_MATCH = ("model", "loss", "aggregator")
PROJECT_DIR = Path(__file__).resolve().parent.parent  # whose git revision goes with the results


class TrainingFailed(RuntimeError):
    """The run cannot go on: the message says why and where the last checkpoint is."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM handled: the message says how to resume.

    `metrics` is set when the stop arrived as the workers finished their last steps anyway: the
    run is complete (model.pt and metrics.json written) and still ends as interrupted (exit 130),
    so a sweep stops there instead of starting its next job.
    """

    def __init__(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics


def dry_build(job: dict[str, Any]) -> Splits:
    """Build data, model, loss and optimizer once on CPU so mistakes surface before any actor."""
    splits: Splits = _explain("data", lambda: build.build_splits(job["data"]))
    model = _explain("model", lambda: build.build_model(job["model"], splits))
    loss_fn = _explain("loss", lambda: build.build_loss(job["loss"], splits.task))
    batch_size, trainer = job["data"]["batch_size"], job["trainer"]
    optimizer = _explain(
        "optimizer",
        lambda: build.build_optimizer(job["optimizer"], model, global_batch=batch_size),
    )
    _explain("aggregator", lambda: instantiate(job["aggregator"], _convert_="all"))
    _explain("model", lambda: build.check_model_fits_data(model, splits, loss_fn))
    if len(splits.train) < job["data"]["batch_size"]:
        raise config.ConfigError(
            f"data.batch_size={job['data']['batch_size']} is larger than the training set "
            f"({len(splits.train)} samples): lower data.batch_size."
        )
    steps_per_epoch = len(splits.train) // batch_size
    total_steps = trainer["epochs"] * steps_per_epoch  # as the worker counts them
    total_steps = min(total_steps, trainer["max_steps"] or total_steps)
    _explain(
        "scheduler",
        lambda: build.build_scheduler(
            job["scheduler"], optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps
        ),
    )
    return splits


def _explain(group: str, make: Any) -> Any:
    try:
        return make()
    except config.ConfigError:
        raise
    except Exception as error:  # the user's class or file: say which group and what it said
        cause = error.__cause__ or error
        raise config.ConfigError(f"{group}: {type(cause).__name__}: {cause}") from error


def load_resume(job: dict[str, Any]) -> checkpoint.Checkpoint | None:
    """The checkpoint named by `resume=`, checked against this job."""
    if not job.get("resume"):
        return None
    path = checkpoint.resolve_resume(job["resume"])
    payload = checkpoint.load(path)
    saved = payload.meta.get("job", {})
    for group in RESUME_MUST_MATCH:
        if group in saved and _resume_key(group, saved[group]) != _resume_key(group, job[group]):
            raise config.ConfigError(
                f"resume={job['resume']}: checkpoint {path.name} was written with {group}="
                f"{saved[group]}, but this run has {group}={job[group]}; a resumed run must keep "
                f"its {group}."
            )
    return payload


def _resume_key(group: str, value: Any) -> Any:
    """What must match on resume: the config, or for the aggregator its class's `resume_key`
    (allreduce and fsdp share theirs: a checkpoint moves between them)."""
    if group != "aggregator":
        return value
    try:
        return get_object(value["_target_"]).resume_key(value)
    except Exception:  # not importable or no hook (a user's class): the whole config
        return value


def train(
    job: dict[str, Any],
    run_dir: RunDirectory,
    overrides: list[str] | None = None,
    *,
    keep_cluster: bool = False,
) -> dict[str, Any]:
    """Run one job end to end; returns the metrics also written to metrics.json.

    `overrides` (the command line's, from Hydra) become HParams columns in TensorBoard.
    `keep_cluster` (a sweep's jobs) leaves Ray running for the next job.
    """
    started = time.perf_counter()
    config.validate(job)
    torch.manual_seed(job["trainer"]["seed"])
    splits = dry_build(job)
    resume = load_resume(job)
    with cluster.connect(job["cluster"], keep=keep_cluster):
        auto = job["trainer"]["device"] == "auto"
        limits = cluster.autoscaler_limits() if auto else None
        device_type = choose_device_type(
            job["trainer"]["device"],
            ray.cluster_resources().get("GPU", 0.0),
            workers=job["trainer"]["workers"],
            autoscaler_gpus=limits.total.get("GPU", 0.0) if limits else 0.0,
            gpus_per_worker=job["trainer"]["gpus_per_worker"],
        )
        supervisor = Supervisor(job, run_dir, splits, device_type, overrides or [])
        result = supervisor.run(resume, started)
    metrics = {
        **result,
        "device": device_type,
        # What the model was built with besides its config (`distrain export` records them).
        "input_shape": list(splits.input_shape),
        "num_outputs": splits.num_outputs,
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir.path),
        "overrides": list(overrides or []),
        "git_revision": git_revision(PROJECT_DIR),
    }
    run_dir.write_metrics(metrics)  # once, complete: a sweep takes a readable one as finished
    if supervisor.stop_requested:
        raise Interrupted(
            f"the stop arrived as training ended: all {result['steps']} steps are done, "
            f"model.pt and metrics.json are in {run_dir.path}.",
            metrics,
        )
    return metrics


def job_for_workers(job: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The job on `world_size` workers, same global batch: fewer workers accumulate more
    micro-batches of the original per-worker size, so memory per step stays where it was."""
    if world_size == job["trainer"]["workers"]:
        return job
    data = dict(job["data"])
    data["micro_batch_size"] = data.get("micro_batch_size") or (
        data["batch_size"] // job["trainer"]["workers"]
    )
    return {**job, "data": data, "trainer": {**job["trainer"], "workers": world_size}}


class Supervisor:
    """Runs worker groups until training completes, restarting after infrastructure failures."""

    def __init__(
        self,
        job: dict[str, Any],
        run_dir: RunDirectory,
        splits: Splits,
        device_type: str,
        overrides: list[str],
    ) -> None:
        self.job, self.run_dir, self.device_type = job, run_dir, device_type
        self.splits, self.overrides = splits, overrides
        self.stragglers: list[dict[str, Any]] = []
        self.trainer = job["trainer"]
        self.task = splits.task
        self.store = checkpoint.CheckpointStore(
            run_dir.checkpoints, self.trainer["keep_checkpoints"]
        )
        self.progress = make_progress(job["logger"]["progress"])
        self.history: list[EpochMetrics] = []
        self.failures: list[dict[str, Any]] = []
        self.writer = CheckpointWriter(
            self.store,
            job={group: job[group] for group in RESUME_MUST_MATCH},
            # Bounded: a share held on a node cut off from this one is not fetched until Ray
            # declares the node dead (minutes); the hang timeout applies to it as to a step.
            fetch_timeout_s=self.trainer["step_timeout_s"],
        )
        # The checkpoint a restart resumes from: the last one written, or the one resumed from.
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step = 0
        self.stop_requested = False  # Ctrl-C/SIGTERM seen, even if the workers finished anyway
        self.last_progress_s = time.monotonic()  # the last step or epoch record from any rank
        self.excluded_nodes: frozenset[str] = frozenset()  # unreachable at an earlier failure
        self.current_nodes: list[dict[str, Any]] = []
        self.steps_per_epoch = len(splits.train) // job["data"]["batch_size"]
        total = self.trainer["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, self.trainer["max_steps"] or total)

    def run(self, resume: checkpoint.Checkpoint | None, started: float) -> dict[str, Any]:
        """Train to the end; `started` is the job's perf_counter start (for wall_s)."""
        payload = resume
        if resume is not None:
            self.last_checkpoint, self.last_checkpoint_step = resume.path, resume.step
        self.board = TensorBoardWriter(self.run_dir.path, purge_step=_purge_step(payload))
        if payload is None:
            self.board.add_text("config", f"```\n{OmegaConf.to_yaml(self.job)}\n```")
            if self.job["logger"]["log_graph"]:
                model = build.build_model(self.job["model"], self.splits)
                self.board.add_graph(model, self.splits.train[0][0][None])
        else:
            self.history = [EpochMetrics(**e) for e in payload.meta.get("history", [])]
            self.progress.message(f"resuming from {payload.path} (step {payload.step})")
        self.board.start_session(hparams_of(self.job, self.overrides))
        self.progress.start(self.total_steps, self.trainer["epochs"], self.steps_per_epoch)
        try:
            while True:
                group = self._start_group(payload)
                try:
                    results = self._watch(group)
                    result = self._result(group, results)
                    wall_s = time.perf_counter() - started
                    self.board.end_session({**result, "wall_s": wall_s})
                    return result
                except GroupFailed as failure:
                    payload = self._recover(failure)
                finally:
                    group.shutdown()
        finally:
            self.progress.stop()
            self.board.close()

    def _need(self, world_size: int) -> cluster.WorkerResources:
        return cluster.WorkerResources(
            world_size,
            self.trainer["cpus_per_worker"],
            worker_gpus(self.device_type, self.trainer["gpus_per_worker"]),
            excluded_nodes=self.excluded_nodes,
        )

    def _start_group(self, payload: checkpoint.Checkpoint | None) -> WorkerGroup:
        """Start a worker group; after a failure, keep trying for trainer.setup_timeout_s.

        Right after a node is lost Ray still counts it (and its freed CPUs) for a while, until
        its heartbeats are missed: placing the group can fail a few times before the cluster's
        view settles, and that is not a configuration error.
        """
        ref = None
        if payload is not None:  # each shard in the object store once; a worker takes its rows
            shards = [ray.put(read()) for read in payload.shards]
            ref = ray.put({"meta": payload.meta, "shards": shards})
        deadline = time.monotonic() + self.trainer["setup_timeout_s"]
        while True:
            group: WorkerGroup | None = None
            try:
                group_job, world_size = self._plan_group()
                group = WorkerGroup(group_job, world_size, self.device_type)
                group.start(self._need(world_size), ref)
            except WorkerError as error:
                if group is not None:
                    group.shutdown()
                raise TrainingFailed(str(error)) from None
            except (config.ConfigError, GroupFailed) as error:
                if group is not None:
                    group.shutdown()
                # The first start: nothing to recover, say what happened; a transport failure
                # while forming the group (NCCL init, a port taken) is retried all the same.
                if not self.failures and not isinstance(error, SetupTransportFailed):
                    if isinstance(error, GroupFailed):
                        raise TrainingFailed(str(error)) from None
                    raise
                if time.monotonic() > deadline:
                    raise TrainingFailed(
                        f"could not start a new worker group within trainer.setup_timeout_s="
                        f"{self.trainer['setup_timeout_s']:g} s after a failure: {error}"
                    ) from None
                time.sleep(1.0)
                continue
            except BaseException:
                if group is not None:
                    group.shutdown()
                raise
            self.run_dir.write_json(
                self.run_dir.path / "workers.json", {"workers": group.describe()}
            )
            if self.failures:  # seconds from noticing the failure to a working group again
                last = self.failures[-1]
                last["recovery_s"] = time.monotonic() - last["detected_s"]
            if world_size < self.trainer["workers"]:
                self.progress.message(
                    f"elastic: continuing on {world_size} of {self.trainer['workers']} workers "
                    f"(trainer.min_workers={self.trainer['min_workers']}), same global batch "
                    f"{self.job['data']['batch_size']}"
                )
            return group

    def _plan_group(self) -> tuple[dict[str, Any], int]:
        """The configured worker count; after a failure, the most that fit (>= min_workers)."""
        configured = self.trainer["workers"]
        placement = self.job["cluster"]["placement"]
        low = self.trainer["min_workers"] or configured
        # Divisors of the configured count keep the original per-worker batch a whole number of
        # micro-batches on fewer workers.
        for world_size in (w for w in range(configured, low - 1, -1) if configured % w == 0):
            try:
                cluster.check_resources(self._need(world_size), placement)
            except config.ConfigError:
                if world_size == low or not self.failures:
                    raise
                continue
            return job_for_workers(self.job, world_size), world_size
        raise AssertionError("unreachable: the loop ends at world_size == low")

    def _recover(self, failure: GroupFailed) -> checkpoint.Checkpoint | None:
        # A node that did not answer is avoided from now on: Ray counts it alive for a minute
        # or more, and a group placed on it would wait for Ray to declare it dead. The driver's
        # own node always answers, whatever a probe under load said.
        here = ray.get_runtime_context().get_node_id()
        self.excluded_nodes |= failure.unreachable_nodes - {here}
        self.failures.append(
            {
                "error": str(failure),
                "detected_s": time.monotonic(),
                # from the last progress anyone saw: what a user waits, detection included
                "last_progress_s": self.last_progress_s,
            }
        )
        restarts, limit = len(self.failures), self.trainer["max_failures"]
        latest = self.store.latest()
        if restarts > limit:
            kept = f"the last checkpoint is {latest}" if latest else "no checkpoint was written"
            raise TrainingFailed(
                f"{failure} — gave up after trainer.max_failures={limit} restarts; {kept}"
                + (f" (continue with resume={self.run_dir.path})." if latest else ".")
            ) from None
        # A write in progress completes, or fails with the group (its shares' owners died).
        self._settle(wait=True, failed=True)
        self.writer.forget()
        payload = checkpoint.load(self.last_checkpoint) if self.last_checkpoint else None
        step = payload.step if payload else 0
        self.progress.message(
            f"restart {restarts}/{limit}: {failure}; resuming from "
            + (f"the checkpoint of step {step}" if payload else "the start")
        )
        # A new event file, so the steps after the checkpoint, logged again, replace the old.
        self.board.reopen(purge_step=step + 1)
        self.board.add_text("faults", f"restart {restarts} at step {step}: {failure}", step)
        self.board.add_scalar("faults/restarts", restarts, step)
        self.history = [e for e in self.history if e.step <= step]
        return payload

    def _watch(self, group: WorkerGroup) -> list[dict[str, Any]]:
        """Wait for every rank's `fit`, streaming records; a dead or silent rank fails the group."""
        collector = MetricsCollector(group.world_size, self.task, self.history)
        logger = self.job["logger"]
        self.detector = StragglerDetector(
            [n["node_ip"] for n in group.nodes],
            threshold=logger["straggler_threshold"],
            patience=logger["straggler_patience"],
        )
        self.current_nodes = group.nodes
        refs = group.fit()
        pending, results = list(refs), []
        last_seen_s = dict.fromkeys(range(group.world_size), time.monotonic())
        epoch_end_checkpoint: Pending | None = None
        stop_deadline: float | None = None
        with StopRequest() as stop:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    results.append(self._result_of(ref, refs[ref], group))
                for record in group.drain():
                    last_seen_s[record["rank"]] = time.monotonic()
                    if record["kind"] in ("step", "epoch"):
                        self._progressed(last_seen_s[record["rank"]])
                    if record["kind"] == "checkpoint":
                        pending_checkpoint = self.writer.add(record, group.world_size)
                        if pending_checkpoint is not None and not record["epoch_end"]:
                            self._save(pending_checkpoint, group)
                        elif pending_checkpoint is not None:  # once its epoch is in the history
                            epoch_end_checkpoint = pending_checkpoint
                    elif record["kind"] != "heartbeat":
                        metrics = collector.add(record)
                        if isinstance(metrics, EpochMetrics) and epoch_end_checkpoint:
                            self._save(epoch_end_checkpoint, group)  # before TensorBoard shows it
                            epoch_end_checkpoint = None
                        self._show(metrics)
                self._settle(wait=False)
                self._check_hang({refs[r] for r in pending}, last_seen_s, group)
                if stop.requested and stop_deadline is None:
                    self.progress.message(
                        "stopping: the workers write a checkpoint at the next boundary "
                        f"(up to {self.trainer['stop_timeout_s']:g} s; Ctrl-C again to stop now)"
                    )
                    group.sink.request_stop.remote()
                    stop_deadline = time.monotonic() + self.trainer["stop_timeout_s"]
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    break
        self.stop_requested = self.stop_requested or stop.requested
        self._settle(wait=True)  # the last checkpoint is on disk before the run ends
        if pending or any(r["stopped"] for r in results):  # stopped early, or gave up waiting
            latest = self.store.latest()
            raise Interrupted(
                f"stopped at step {self.last_checkpoint_step}; "
                + (
                    f"checkpoint {latest}. Continue with: distrain resume={self.run_dir.path}"
                    if latest
                    else "no checkpoint was written."
                )
            )
        return results

    def _progressed(self, now_s: float) -> None:
        """A step or epoch record arrived: after a failure, the first one closes its downtime.

        `downtime_s` runs from the last progress before the failure to the first after it
        (detection, teardown, restart, state restore and the steps redone up to the next
        logged one), so a partition's wait for the timeout is counted, not only the restart.
        """
        self.last_progress_s = now_s
        failure = self.failures[-1] if self.failures else None
        if failure is not None and "downtime_s" not in failure:
            failure["detection_s"] = failure["detected_s"] - failure["last_progress_s"]
            failure["downtime_s"] = now_s - failure.pop("last_progress_s")
            failure.pop("detected_s")

    def _result_of(self, ref: Any, rank: int, group: WorkerGroup) -> dict[str, Any]:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as error:  # the process or its node is gone
            raise GroupFailed(f"{group.where(rank)} died: {_first_line(error)}") from None
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, NonFiniteError):
                raise TrainingFailed(str(cause)) from None
            if isinstance(cause, config.ConfigError):  # bad data found in a batch (a token id)
                raise config.ConfigError(f"{group.where(rank)}: {cause}") from None
            if _is_collective_failure(cause):
                # A collective broke because a peer went away: infrastructure, so restart. The
                # peer's own death may be reported a moment later; name it if it is.
                dead = _dead_peers(group, exclude=rank)
                raise GroupFailed(
                    ", ".join(f"{group.where(r)} died" for r in dead)
                    or f"{group.where(rank)}: {_first_line(cause)}"
                ) from None
            raise TrainingFailed(
                f"{group.where(rank)} raised {type(cause).__name__}: {cause} "
                "(its traceback is printed above)"
            ) from None

    def _check_hang(
        self, running: set[int], last_seen_s: dict[int, float], group: WorkerGroup
    ) -> None:
        timeout_s = self.trainer["step_timeout_s"]
        now = time.monotonic()
        silent = [r for r in running if now - last_seen_s[r] > timeout_s]
        if silent:
            silent.sort(key=last_seen_s.get)  # the first to fall silent is the likely culprit
            names = ", ".join(
                f"{group.where(r)}, silent {now - last_seen_s[r]:.0f} s" for r in silent
            )
            directory = self.run_dir.path / "hangs" / f"failure-{len(self.failures) + 1}"
            stacks, lost = hangs.dump_stacks(group.nodes, directory)
            frame = hangs.stuck_frame(stacks.get(silent[0], ""))
            where = f"rank {silent[0]} is in {frame}; " if frame else ""
            raise GroupFailed(
                f"no progress within trainer.step_timeout_s={timeout_s:g} s from {names}: "
                "the worker is hung (stuck collective, frozen process) or its node is lost; "
                f"{where}every rank's stack is in {directory}",
                unreachable_nodes=lost,
            )

    def _save(self, pending: Pending, group: WorkerGroup) -> None:
        """Write a checkpoint in the background; with trainer.async_checkpoint=false, wait for
        it and let the workers (waiting for it) go on."""
        self._settle(wait=True)  # one write at a time
        self.writer.submit(pending, [dataclasses.asdict(e) for e in self.history])
        if not self.trainer["async_checkpoint"]:
            self._settle(wait=True)
            group.sink.saved.remote(pending.step)

    def _settle(self, *, wait: bool, failed: bool = False) -> None:
        """Take the result of the checkpoint write in progress, if it is done (or `wait`).

        A share that could not be fetched fails the group as a hang would (naming unreachable
        nodes); once the group has `failed` anyway, a lost write only leaves the previous
        checkpoint as the latest.
        """
        result = self.writer.wait() if wait else self.writer.finished()
        if result is None:
            return
        if result.saved is not None:
            log.debug("checkpoint %s written in %.3f s", result.saved.path, result.write_s)
            self.last_checkpoint, self.last_checkpoint_step = result.saved.path, result.step
            return
        error, step = result.error, result.step
        if failed:
            self.progress.message(f"the checkpoint of step {step} was lost: {_first_line(error)}")
        elif isinstance(error, ShareTimeout):
            nodes = {n["node_id"] for n in self.current_nodes}
            raise GroupFailed(
                f"checkpoint of step {step}: the workers' shares did not arrive within "
                f"trainer.step_timeout_s={self.trainer['step_timeout_s']:g} s (a node "
                "unreachable from the driver?)",
                unreachable_nodes=hangs.unreachable(nodes),
            )
        elif isinstance(error, ShareLost):  # a worker died: the group has failed
            raise GroupFailed(f"checkpoint of step {step} lost: {_first_line(error)}")
        else:  # the disk (full, read-only): not something a restart fixes
            raise TrainingFailed(f"checkpoint of step {step} could not be written: {error}")

    def _show(self, metrics: Any) -> None:
        if metrics is None:
            return
        if isinstance(metrics, EpochMetrics):
            self.board.log_epoch(metrics)
            self.progress.epoch(metrics)
        elif isinstance(metrics, HistogramMetrics):
            self.board.log_histograms(metrics)
        elif isinstance(metrics, SampleMetrics):
            self.board.log_samples(metrics)
        else:
            straggler = self.detector.update(metrics)
            self.board.log_step(metrics, straggler_rank=self.detector.flagged)
            self.progress.step(metrics)
            if straggler is not None:
                self.progress.message(straggler.message)
                self.board.log_straggler(straggler)
                self.stragglers.append(straggler.as_dict())

    def _result(self, group: WorkerGroup, results: list[dict[str, Any]]) -> dict[str, Any]:
        rank0 = next(r for r in results if r["rank"] == 0)
        torch.save(rank0["state_dict"], self.run_dir.model_path)
        summary = MetricsCollector(group.world_size, self.task, self.history).summary()
        return {
            **summary,
            "steps": rank0["steps"],
            "workers": group.world_size,
            "nodes": [n["node_id"] for n in group.nodes],
            "startup_s": group.startup_s,
            "skipped_steps": rank0["skipped_steps"],
            "stragglers": self.stragglers,
            # Each rank's aggregator counters (bytes sent, staleness, optimizer-state bytes, ...).
            "aggregator": [r["aggregator"] for r in sorted(results, key=lambda r: r["rank"])],
            "restarts": len(self.failures),
            "checkpoints": self.writer.stats(),
            # Clock readings are internal: a failure with no progress after it keeps none.
            "failures": [
                {k: v for k, v in f.items() if k not in ("detected_s", "last_progress_s")}
                for f in self.failures
            ],
        }


class StopRequest:
    """Ctrl-C and SIGTERM while workers train: the first asks for a checkpoint and a clean stop,
    the second stops at once (KeyboardInterrupt). A flag, not an exception, so the driver never
    loses records it was in the middle of writing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _is_collective_failure(error: BaseException) -> bool:
    """gloo and NCCL report a vanished peer as DistError or a RuntimeError naming the backend."""
    return is_transport_failure(error)


def _dead_peers(group: WorkerGroup, exclude: int, grace_s: float = 3.0) -> list[int]:
    """Ranks whose actor is dead, waiting up to `grace_s` for Ray to report it."""
    probes = {w.node.remote(): r for r, w in enumerate(group.workers) if r != exclude}
    dead = []
    for ref, rank in probes.items():
        try:
            ray.get(ref, timeout=grace_s)
        except ray.exceptions.RayActorError:
            dead.append(rank)
        except ray.exceptions.GetTimeoutError:
            pass  # busy (in a collective) or frozen: alive as far as Ray knows
    return dead


def _purge_step(payload: checkpoint.Checkpoint | None) -> int | None:
    return payload.step + 1 if payload else None


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
