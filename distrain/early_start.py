"""Workers started while the driver still checks the job, so that their start-up overlaps it.

From the command to the first step, a job on an embedded Ray waits for Ray to start, then for its
worker processes to start and import torch, torch._dynamo and distrain (about 2 s of CPU each),
while the driver's dry build (preflight.py) runs on a thread from the start. When the dry build
ends after Ray is up (a larger dataset, a busy machine), the workers' start-up used to wait for
it. Here they start as soon as Ray is up and the job's settings have passed the checks that need
no build, with no job: they import, then wait. The checked job reaches them as it reaches the
workers a sweep keeps (warm_workers.py: `WorkerGroup._take_kept`), so nothing else changes.

Only on an embedded Ray this job started: it is the job's own, so workers started for a job that
then fails its dry build hold nothing anyone else needs, and end with that Ray at once (the
error is the same paragraph, from the driver). A cluster is joined only after every check.
"""

from __future__ import annotations

import logging
import uuid

from distrain import reservation
from distrain.config import Config, ConfigError
from distrain.warm_workers import KeptWorkers, Shape

log = logging.getLogger("distrain")
ORIGIN = "early, while the job was checked"  # workers.json's `started`


def start(job: Config, device_type: str) -> KeptWorkers | None:
    """The configured workers (no job yet), their reservation and the metrics sink; None where
    the group's own start must decide (the workers would not fit: it says why, after the
    checks)."""
    # Imported here: distrain.actors imports torch, which the driver's check thread imports too.
    from distrain import actors
    from distrain.device import worker_gpus

    trainer = job.trainer
    gpus = worker_gpus(device_type, trainer.gpus_per_worker)
    need = reservation.WorkerResources(trainer.workers, trainer.cpus_per_worker, gpus)
    try:
        if reservation.check_resources(need, job.cluster.placement.value):
            return None  # they fit only once an autoscaler adds nodes
        placement_group = reservation.place(need, job.cluster, scale_up=False)
    except ConfigError as error:
        log.debug("no workers started ahead of the checks: %s", error)
        return None
    group_id = uuid.uuid4().hex[:8]
    names = [f"distrain-{group_id}-rank{rank}-{rank + 1}" for rank in range(need.workers)]
    workers = [
        actors.start_worker(name, need, placement_group, rank) for rank, name in enumerate(names)
    ]
    # After the workers: Ray gives them the processes it started with the driver (one per core),
    # and the sink, which has nothing to do until they report, a new one.
    sink = actors.start_sink(trainer.checkpoint_min_interval_s)
    for worker in workers:
        worker.preload.remote()  # queued before the job: the worker imports while it waits
    shape = Shape.of(need, job.cluster, device_type)
    return KeptWorkers(
        shape, placement_group, workers, names, sink, group_id, len(workers), origin=ORIGIN
    )
