"""The driver: check the job, reserve the cluster, start the workers, watch them, record results.

It does not take part in training steps: workers run the loop (SPMD) and report to a sink that
the driver drains a few times a second into TensorBoard, the terminal and metrics.json.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distrain import build, cluster, config
from distrain.aggregators.base import GradientAggregator
from distrain.data.base import Splits
from distrain.device import choose_device_type, gpus_per_worker
from distrain.metrics import EpochMetrics, MetricsCollector
from distrain.progress import ProgressView, make_progress
from distrain.reporting import MetricsSink
from distrain.rundir import RunDirectory
from distrain.tensorboard_writer import TensorBoardWriter
from distrain.worker import Worker

log = logging.getLogger("distrain")
POLL_S = 0.25  # how often the driver drains metrics and checks on the workers


class TrainingFailed(RuntimeError):
    """A worker died or hung; the message names the ranks and nodes."""


def dry_build(job: dict[str, Any]) -> Splits:
    """Build data, model, loss and optimizer once on CPU so mistakes surface before any actor."""
    splits: Splits = _explain("data", lambda: build.build_splits(job["data"]))
    model = _explain("model", lambda: build.build_model(job["model"], splits))
    loss_fn = _explain("loss", lambda: build.build_loss(job["loss"]))
    _explain("optimizer", lambda: build.build_optimizer(job["optimizer"], model))
    _explain("aggregator", lambda: instantiate(job["aggregator"], _convert_="all"))
    _explain("model", lambda: build.check_model_fits_data(model, splits, loss_fn))
    if len(splits.train) < job["data"]["batch_size"]:
        raise config.ConfigError(
            f"data.batch_size={job['data']['batch_size']} is larger than the training set "
            f"({len(splits.train)} samples): lower data.batch_size."
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


def train(job: dict[str, Any], run_dir: RunDirectory) -> dict[str, Any]:
    """Run one job end to end; returns the metrics also written to metrics.json."""
    started = time.perf_counter()
    config.validate(job)
    torch.manual_seed(job["trainer"]["seed"])
    splits = dry_build(job)
    trainer, cluster_cfg = job["trainer"], job["cluster"]
    placement = cluster_cfg["placement"]
    with cluster.connect(cluster_cfg):
        device_type = choose_device_type(trainer["device"], ray.cluster_resources().get("GPU", 0.0))
        need = cluster.WorkerResources(
            trainer["workers"], trainer["cpus_per_worker"], gpus_per_worker(device_type)
        )
        cluster.check_resources(need, placement)
        group = cluster.reserve(need, placement, timeout_s=cluster_cfg["connect_timeout_s"])
        progress = make_progress(job["logger"]["progress"])
        board = TensorBoardWriter(run_dir.path)
        epochs, max_steps = trainer["epochs"], trainer["max_steps"]
        total_steps = epochs * (len(splits.train) // job["data"]["batch_size"])
        try:
            progress.start(min(total_steps, max_steps or total_steps), epochs)
            board.add_text("config", f"```\n{OmegaConf.to_yaml(job)}\n```")
            result = _run_workers(job, group, device_type, splits.task, progress, board)
        finally:
            progress.stop()
            board.close()
            remove_placement_group(group)
    metrics = {
        **result["summary"],
        "workers": trainer["workers"],
        "device": device_type,
        "nodes": result["nodes"],
        "startup_s": result["startup_s"],
        "aggregator": result["aggregator"],  # each rank's counters (bytes, staleness, ...)
        "wall_s": time.perf_counter() - started,
        "run_dir": str(run_dir.path),
    }
    torch.save(result["state_dict"], run_dir.model_path)
    run_dir.write_metrics(metrics)
    return metrics


def _run_workers(
    job: dict[str, Any],
    group: PlacementGroup,
    device_type: str,
    task: str,
    progress: ProgressView,
    board: TensorBoardWriter,
) -> dict[str, Any]:
    trainer = job["trainer"]
    world_size = trainer["workers"]
    sink = MetricsSink.remote()
    actor = ray.remote(Worker)
    workers = [
        actor.options(
            num_cpus=trainer["cpus_per_worker"],
            num_gpus=gpus_per_worker(device_type),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank
            ),
        ).remote(rank, world_size, job, device_type, sink)
        for rank in range(world_size)
    ]
    aggregator_cls: type[GradientAggregator] = get_object(job["aggregator"]["_target_"])
    rendezvous: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        nodes = _get([w.node.remote() for w in workers], trainer["setup_timeout_s"], "start")
        actors_s = time.perf_counter() - started
        rendezvous = aggregator_cls.rendezvous(workers, job["aggregator"])
        _get([w.setup.remote(rendezvous) for w in workers], trainer["setup_timeout_s"], "set up")
        setup_s = time.perf_counter() - started - actors_s
        collector = MetricsCollector(world_size, task)
        results = _watch(workers, nodes, sink, collector, progress, board, trainer)
    finally:
        # The aggregator's own actors (e.g. parameter servers) go with the workers.
        for handle in [*workers, sink, *aggregator_cls.actors(rendezvous)]:
            ray.kill(handle)
    rank0 = next(r for r in results if r["rank"] == 0)
    return {
        "summary": collector.summary(),
        "nodes": [n["node_id"] for n in nodes],
        # Where start-up time goes: actor processes starting, then building + rendezvous.
        "startup_s": {"actors": actors_s, "setup": setup_s},
        "state_dict": rank0["state_dict"],
        "aggregator": [r["aggregator"] for r in sorted(results, key=lambda r: r["rank"])],
    }


def _watch(
    workers: list[Any],
    nodes: list[dict[str, Any]],
    sink: Any,
    collector: MetricsCollector,
    progress: ProgressView,
    board: TensorBoardWriter,
    trainer: dict[str, Any],
) -> list[dict[str, Any]]:
    """Wait for the workers' `fit`, streaming their metrics; a dead or silent worker is fatal."""
    refs = {w.fit.remote(): rank for rank, w in enumerate(workers)}
    pending, results = list(refs), []
    last_progress_s = {rank: time.time() for rank in range(len(workers))}
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        for ref in done:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as error:
                rank = refs[ref]
                raise TrainingFailed(
                    f"worker rank {rank} on node {nodes[rank]['node_ip']} failed: {error}"
                ) from error
        for record in ray.get(sink.drain.remote()):
            last_progress_s[record["rank"]] = time.time()
            metrics = collector.add(record)
            if metrics is None:
                continue
            if isinstance(metrics, EpochMetrics):
                board.log_epoch(metrics)
                progress.epoch(metrics)
            else:
                board.log_step(metrics)
                progress.step(metrics)
        running = {refs[ref] for ref in pending}
        silent = [
            r for r in running if time.time() - last_progress_s[r] > trainer["step_timeout_s"]
        ]
        if silent:
            where = ", ".join(f"rank {r} on node {nodes[r]['node_ip']}" for r in sorted(silent))
            raise TrainingFailed(
                f"no progress for {trainer['step_timeout_s']:g} s (trainer.step_timeout_s) from "
                f"{where}: the worker is hung or its node is lost."
            )
    return results


def _get(refs: list[Any], timeout_s: float, what: str) -> Any:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TrainingFailed(
            f"the workers did not {what} within trainer.setup_timeout_s={timeout_s:g} s"
        ) from None
