"""The value checks Hydra cannot make, on a resolved job: one ConfigError naming the bad value.

Hydra has already checked types and unknown keys against the schema (distrain/config.py) by the
time `validate` runs; the CLI calls it once, before Ray or any actor starts, and the driver again
for jobs given as dicts (tests, benchmarks). Checks that need torch (an aggregator's `check_job`,
the dry build) come later, in distrain/preflight.py.
"""

from __future__ import annotations

import math
from typing import Any

from distrain.config import LR_SCALINGS, PRECISIONS, ConfigError, Loader


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
    # Counts that null turns off, with what null means.
    for key, off in (
        ("eval_every_n_steps", "epoch ends only"),
        ("checkpoint_every_n_steps", "epoch ends only"),
        ("early_stopping_patience", "never stop early"),
    ):
        value = trainer[key]
        _require(
            value is None or value >= 1, f"trainer.{key}={value} must be >= 1, or null ({off})."
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
    for key in ("profile_steps", "profile_after_step"):
        _require(
            logger[key] >= 0, f"logger.{key}={logger[key]} must be >= 0 (profile_steps=0: off)."
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
