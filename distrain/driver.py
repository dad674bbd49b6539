"""The driver: check the job, start or join Ray, supervise the training, record the results.

`train` (a script's entry) checks and types the plain job; `run` takes it from there (the CLI
checks and types it itself, before importing this module): the dry build and the resume
checkpoint (`preflight`), Ray (`cluster`), the device type, then the `Supervisor`
(distrain/supervisor.py), which runs worker groups until training completes, and metrics.json.

This module imports neither torch nor the parts that do (preflight, device, supervisor) at its
top: for an embedded Ray, `run` starts Ray on the main thread at once while a second thread
imports them and runs the dry build. Importing torch is a second or more of this process's
CPU, and starting Ray is seconds of other processes starting, so the two overlap; once Ray is
up, its workers start too, with no job until the dry build has passed (early_start.py).
"""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from distrain import (
    cluster,
    config,
    forked_workers,
    reservation,
    simulate,
    startup_imports,
    validation,
    warm_workers,
)
from distrain.errors import ConfigError, Interrupted
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
    if job.cluster.address is not None or not job.cluster.fork_workers:
        forked_workers.stop_ahead()  # the command started one for a Ray this job does not start
    slow_rank = simulate.slow_rank_from_env(job.trainer.workers)  # a straggler made on purpose
    check_delay_s = simulate.check_delay_s_from_env()  # a slow dry build made on purpose
    # An embedded Ray starts while the job is checked. A cluster is joined only after the
    # checks: a mistake in the data or model is reported before any connection is tried.
    checks = start_checks(job, background=job.cluster.address is None, delay_s=check_delay_s)
    with cluster.connect(job.cluster, keep=keep_cluster) as lasting:
        # The workers start while the dry build runs, on a Ray this job started (early_start.py).
        ahead = _start_ahead(job, checks) if not lasting and checks.background else None
        checked = checks.done.result()  # a mistake raises here; Ray is shut down on the way out
        from distrain.supervisor import Supervisor  # imported by the checks by now

        splits, plan, resume = checked.splits, checked.plan, checked.resume
        device_type = choose_device_type(job)
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
            started_ahead=ahead,
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


def choose_device_type(job: config.Config) -> str:
    """trainer.device on the cluster Ray is connected to: "cpu" or "cuda"."""
    from distrain import device

    trainer = job.trainer
    limits = reservation.autoscaler_limits() if trainer.device == "auto" else None
    return device.choose_device_type(
        trainer.device,
        ray.cluster_resources().get("GPU", 0.0),
        workers=trainer.workers,
        autoscaler_gpus=limits.total.get("GPU", 0.0) if limits else 0.0,
        gpus_per_worker=trainer.gpus_per_worker,
    )


def _start_ahead(job: config.Config, checks: Checks) -> warm_workers.KeptWorkers | None:
    """The workers, started once the job's settings have passed the checks that build nothing
    (None if they did not, or if the workers would not fit: the checks and the group's start
    then say why, in their order)."""
    from distrain import early_start

    while not checks.settings_passed.wait(0.02):
        if checks.done.done():  # a mistake in the settings: no worker starts
            return None
    if checks.done.done() and checks.done.exception() is not None:
        return None  # the build found a mistake before Ray was up
    try:
        return early_start.start(job, choose_device_type(job))
    except ConfigError:
        return None


@dataclass(frozen=True)
class Checks:
    """The checks before any training (`_check`), running or done."""

    done: Future[Checked]
    settings_passed: threading.Event  # the checks that build nothing have passed
    background: bool  # on a thread, beside an embedded Ray's start


def _check(job: config.Config, settings_passed: threading.Event, delay_s: float) -> Checked:
    """torch and the job's code imported, the seed set, then `preflight.check`'s two parts
    (the build `delay_s` late: simulate.py), with the garbage collector paused
    (startup_imports.py)."""
    with startup_imports.collection_paused():
        return _check_now(job, settings_passed, delay_s)


def _check_now(job: config.Config, settings_passed: threading.Event, delay_s: float) -> Checked:
    import torch

    from distrain import preflight

    torch.manual_seed(job.trainer.seed)
    preflight.check_settings(job)
    # Here, where this thread waits for an embedded Ray's start anyway, not on the main thread
    # between that start and the first step: the supervisor and the actors it starts (~0.3 s
    # there, with torch's TensorBoard writer and rich), and the libraries Ray imports on the
    # first actor (startup_imports.py). Before `settings_passed`, which the main thread waits
    # for before it imports what the early workers need: the two never import distrain's
    # modules side by side.
    import distrain.supervisor  # noqa: F401

    startup_imports.import_ray_dependencies()
    # What the imports made (a few hundred thousand objects, no garbage) lives as long as this
    # process: frozen, the collector never walks it again. Left young, it was walked by the
    # first collections after the pause, between Ray's start and the first step (0.08 s and
    # 0.09 s of this process, measured on the CNN bench).
    gc.freeze()
    settings_passed.set()
    time.sleep(delay_s)
    return preflight.check_build(job)


def start_checks(job: config.Config, *, background: bool, delay_s: float = 0.0) -> Checks:
    """`_check`, now (a mistake raises here) or on a thread while the main thread starts an
    embedded Ray (ray.init must run on the main thread: Ray ties its daemons' lives to the
    thread that started them). Only workers with no job (`_start_ahead`) start before the
    result is taken, so a mistake still ends the run before any training starts."""
    settings_passed = threading.Event()
    if not background:
        done: Future[Checked] = Future()
        done.set_result(_check(job, settings_passed, delay_s))
        return Checks(done, settings_passed, background)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distrain-preflight")
    future = executor.submit(_check, job, settings_passed, delay_s)
    executor.shutdown(wait=False)  # the thread ends with the check
    return Checks(future, settings_passed, background)
