"""The driver: check the job, start or join Ray, supervise the training, record the results.

`train` (a script's entry) checks and types the plain job; `run` takes it from there (the CLI
checks and types it itself, before importing this module): the dry build and the resume
checkpoint (`preflight`), Ray (`cluster`), the device type, then the `Supervisor`
(distrain/supervisor.py), which runs worker groups until training completes, and metrics.json.

This module imports neither torch nor the parts that do (preflight, device, supervisor) at its
top: for an embedded Ray, `run` starts Ray on the main thread at once while a second thread
imports them and runs the dry build. Importing torch is a second or more of this process's
CPU, and starting Ray is seconds of other processes starting, so the two overlap.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from distrain import cluster, config, reservation, simulate, validation, warm_workers
from distrain.errors import Interrupted
from distrain.rundir import RunDirectory, git_revision

if TYPE_CHECKING:
    from distrain.preflight import Checked

PROJECT_DIR = Path(__file__).resolve().parent.parent  # whose git revision goes with the results


def train(
    plain_job: dict[str, Any],
    run_dir: RunDirectory,
    overrides: list[str] | None = None,
    *,
    keep_cluster: bool = False,
    keep_workers: bool = False,
) -> dict[str, Any]:
    """Run one job end to end from its plain values (a script's entry: `cli.compose_job`, then
    this); returns the metrics also written to metrics.json.

    `overrides` (the command line's, from Hydra) become HParams columns in TensorBoard.
    `keep_cluster` (a sweep's jobs) leaves Ray running for the next job, and its workers.
    `keep_workers` (a script's jobs on the Ray it started) keeps the workers for the next job
    of the same shape, which then starts without new processes; `release_workers()` frees them.
    """
    validation.validate(plain_job)
    # Typed once; below here no part reads the job by string keys.
    return run(
        config.typed(plain_job),
        run_dir,
        overrides,
        keep_cluster=keep_cluster,
        keep_workers=keep_workers,
    )


def release_workers() -> None:
    """Free the workers a job run with `keep_workers=True` kept (distrain/warm_workers.py)."""
    warm_workers.release()


def run(
    job: config.Config,
    run_dir: RunDirectory,
    overrides: list[str] | None = None,
    *,
    keep_cluster: bool = False,
    keep_workers: bool = False,
) -> dict[str, Any]:
    """Run one checked and typed job (`train` checks and types it; so does the CLI, before it
    imports this module)."""
    started = time.perf_counter()
    slow_rank = simulate.slow_rank_from_env(job.trainer.workers)  # a straggler made on purpose
    # An embedded Ray starts while the job is checked. A cluster is joined only after the
    # checks: a mistake in the data or model is reported before any connection is tried.
    checks = start_checks(job, background=job.cluster.address is None)
    with cluster.connect(job.cluster, keep=keep_cluster) as lasting:
        checked = checks.result()  # a mistake raises here; Ray is shut down on the way out
        # Imported by the checks (with torch) by now: these lines cost no import time.
        from distrain.device import choose_device_type
        from distrain.supervisor import Supervisor

        splits, plan, resume = checked.splits, checked.plan, checked.resume
        auto = job.trainer.device == "auto"
        limits = reservation.autoscaler_limits() if auto else None
        device_type = choose_device_type(
            job.trainer.device,
            ray.cluster_resources().get("GPU", 0.0),
            workers=job.trainer.workers,
            autoscaler_gpus=limits.total.get("GPU", 0.0) if limits else 0.0,
            gpus_per_worker=job.trainer.gpus_per_worker,
        )
        supervisor = Supervisor(
            job,
            run_dir,
            splits,
            plan,
            device_type,
            overrides or [],
            slow_rank=slow_rank,
            # Kept only where Ray outlives this job: an embedded one ends with it.
            keep_workers=lasting and (keep_cluster or keep_workers),
        )
        result = supervisor.run(resume, started)
    metrics = {
        **result,
        "device": device_type,
        # What the model was built with besides its config (`distrain export` records them),
        # and how a language model's tokens read as text (`distrain sample`).
        "task": splits.task,
        "input_shape": list(splits.input_shape),
        "num_outputs": splits.num_outputs,
        "byte_level": getattr(splits.val, "byte_level", False),
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


def _check(job: config.Config) -> Checked:
    """torch and the job's code imported, the seed set, then `preflight.check`."""
    import torch

    from distrain import preflight

    torch.manual_seed(job.trainer.seed)
    return preflight.check(job)


def start_checks(job: config.Config, *, background: bool) -> Future[Checked]:
    """`_check`, now (a mistake raises here) or on a thread while the main thread starts an
    embedded Ray (ray.init must run on the main thread: Ray ties its daemons' lives to the
    thread that started them). Nothing else starts until the result is taken, so a mistake
    still ends the run before any actor."""
    if not background:
        done: Future[Checked] = Future()
        done.set_result(_check(job))
        return done
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distrain-preflight")
    future = executor.submit(_check, job)
    executor.shutdown(wait=False)  # the thread ends with the check
    return future
