"""Checks on the driver before any actor starts: the job's parts built once, the resume point.

A mistake in a user's class or file surfaces here as one `ConfigError` naming the group, not as a
traceback from every worker a minute later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object, instantiate

from distrain import build, checkpoint, config
from distrain.data.base import Splits
from distrain.plan import StepPlan, plan_steps

# Parts of the job a checkpoint must agree with to be resumed (the rest may change on resume).
RESUME_MUST_MATCH = ("model", "loss", "aggregator")


@dataclass(frozen=True)
class Checked:
    """What the checks found: the data, the step plan, the checkpoint to resume from."""

    splits: Splits
    plan: StepPlan
    resume: checkpoint.Checkpoint | None


def check(job: config.Config) -> Checked:
    """`check_settings`, then `check_build`."""
    check_settings(job)
    return check_build(job)


def check_settings(job: config.Config) -> None:
    """The checks that build nothing: the aggregator's own."""
    check_aggregator(job)


def check_build(job: config.Config) -> Checked:
    """The dry build, then the resume checkpoint checked against it."""
    splits, plan, group_sizes = dry_build(job)
    resume = load_resume(job)
    if resume is not None:
        check_resume_groups(job, resume, group_sizes)
    return Checked(splits, plan, resume)


def check_aggregator(job: config.Config) -> None:
    """Settings elsewhere in the job that the chosen aggregator cannot honour (its `check_job`).

    Here, not in `validation.validate`: the aggregator's class imports torch, which the CLI's
    value checks do without. A `_target_` that does not import is left to the dry build, which
    says why.
    """
    try:
        aggregator_cls = get_object(job.aggregator["_target_"])
    except Exception:
        return
    check_job = getattr(aggregator_cls, "check_job", None)
    if check_job is not None:
        check_job(job)


def dry_build(job: config.Config) -> tuple[Splits, StepPlan, list[int]]:
    """Build data, model, loss and optimizer once on CPU so mistakes surface before any actor;
    returns the data's splits, the run's step plan (the batch arithmetic, checked) and the
    sizes of the optimizer's parameter groups."""
    splits: Splits = _explain("data", lambda: build.build_splits(job.data))
    model = _explain("model", lambda: build.build_model(job.model, splits))
    loss_fn = _explain("loss", lambda: build.build_loss(job.loss, splits.task))
    batching, trainer = job.data.batching, job.trainer
    with _optimizers_without_dynamo():
        optimizer = _explain(
            "optimizer",
            lambda: build.build_optimizer(job.optimizer, model, global_batch=batching.batch_size),
        )
    _explain("aggregator", lambda: instantiate(job.aggregator, _convert_="all"))
    _explain("model", lambda: build.check_model_fits_data(model, splits, loss_fn))
    plan = plan_steps(
        len(splits.train),
        global_batch=batching.batch_size,
        micro_batch=batching.micro_batch_size,
        world_size=trainer.workers,
        epochs=trainer.epochs,
        max_steps=trainer.max_steps,
    )
    _explain(
        "scheduler",
        lambda: build.build_scheduler(
            job.scheduler,
            optimizer,
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=plan.total_steps,
        ),
    )
    return splits, plan, [len(group["params"]) for group in optimizer.param_groups]


@contextmanager
def _optimizers_without_dynamo() -> Iterator[None]:
    """Optimizers built inside spare this process torch's import of torch._dynamo (~1.5 s of
    CPU with torch 2.14, on the way to every run's first step).

    torch exempts `Optimizer.add_param_group` from dynamo's tracing with `torch._disable_dynamo`,
    which imports torch._dynamo on the first call and caches the exempted function on the
    original as `__dynamo_disable`. The dry build traces nothing, so the exemption is moot here:
    for its duration the cache holds the function itself, and the import is skipped. Nothing
    changes where torch._dynamo is already imported (the import is free then), and the cache is
    emptied after, so the process is left as torch made it. Were torch to rename the attribute,
    the import would simply happen (slower, never wrong).
    """
    import sys

    import torch

    original = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__", None)
    if original is None or "torch._dynamo" in sys.modules:
        yield
        return
    original.__dynamo_disable = original
    try:
        yield
    finally:
        if getattr(original, "__dynamo_disable", None) is original:
            del original.__dynamo_disable


def _explain(group: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except config.ConfigError:
        raise
    except Exception as error:  # the user's class or file: say which group and what it said
        cause = error.__cause__ or error
        if isinstance(cause, config.ConfigError):  # raised in a constructor Hydra called
            raise cause from None
        if str(cause).startswith(f"{group}."):  # it names the key already (model.n_head=...)
            raise config.ConfigError(str(cause)) from error
        raise config.ConfigError(f"{group}: {type(cause).__name__}: {cause}") from error


def load_resume(job: config.Config) -> checkpoint.Checkpoint | None:
    """The checkpoint named by `resume=`, checked against this job."""
    if not job.resume:
        return None
    path = checkpoint.resolve_resume(job.resume)
    saved_checkpoint = checkpoint.load(path)
    saved = saved_checkpoint.meta.get("job", {})
    for group in RESUME_MUST_MATCH:
        ours = getattr(job, group)
        if group in saved and _resume_key(group, saved[group]) != _resume_key(group, ours):
            raise config.ConfigError(
                f"resume={job.resume}: checkpoint {path.name} was written with {group}="
                f"{saved[group]}, but this run has {group}={ours}; a resumed run must keep "
                f"its {group}."
            )
    return saved_checkpoint


def check_resume_groups(
    job: config.Config, resume: checkpoint.Checkpoint, group_sizes: list[int]
) -> None:
    """The checkpoint's optimizer state is stored by position in the parameter groups, so the
    groups must be the same (they change with optimizer.decay_norms_and_biases)."""
    saved = list(resume.meta["optimizer"]["group_sizes"])
    if saved != group_sizes:
        decay = str(job.optimizer.get("decay_norms_and_biases", True)).lower()
        raise config.ConfigError(
            f"resume={job.resume}: the checkpoint's optimizer has parameter groups of {saved} "
            f"tensors, this run's has {group_sizes} (optimizer.decay_norms_and_biases={decay}); "
            "resume with the setting the checkpoint was written with."
        )


def _resume_key(group: str, value: Any) -> Any:
    """What must match on resume: the config, or for the aggregator its class's `resume_key`
    (allreduce and fsdp share theirs: a checkpoint moves between them)."""
    if group != "aggregator":
        return value
    try:
        return get_object(value["_target_"]).resume_key(value)
    except Exception:  # not importable or no hook (a user's class): the whole config
        return value
