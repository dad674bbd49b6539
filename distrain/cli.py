"""`distrain`: the Hydra application. Composes conf/ + overrides, resolves, hands off to the driver.

User mistakes end as one paragraph on stderr and exit code 2, not a traceback; a failed training
run exits 1; Ctrl-C exits 130. In a --multirun sweep a failed job is recorded and the sweep goes on
(the sweep then exits 1); see distrain/sweep.py for how a sweep is resumed and summarised.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

# Only what composing and checking a job needs is imported here: the driver (torch, Ray: ~2 s)
# once the job is checked, so a mistake in it is named in well under a second.
from distrain import config, config_errors, resume_command, validation, versions
from distrain.config import register_configs
from distrain.errors import ConfigError, Interrupted, TrainingFailed
from distrain.rundir import RunDirectory

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PATH_KEYS = ("root", "path", "val_root")  # data paths made absolute before workers see them
log = logging.getLogger("distrain")
# How each way a run can end is named on stderr, and the exit code it ends with.
EXIT_CODES: dict[type[BaseException], tuple[str, int]] = {
    ConfigError: ("configuration error", 2),
    TrainingFailed: ("training failed", 1),  # and a sweep with a failed job
    KeyboardInterrupt: ("interrupted", 130),  # Ctrl-C or SIGTERM; Interrupted says how to resume
}


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The job as plain values: interpolations resolved, enums as strings, paths absolute."""
    try:
        job = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} has no value: set it on the command line.") from None
    except InterpolationResolutionError as error:
        raise ConfigError(_unresolved(error)) from None
    for key in PATH_KEYS:
        if isinstance(job["data"].get(key), str):
            job["data"][key] = str(Path(job["data"][key]).expanduser().resolve())
    return job


def _unresolved(error: InterpolationResolutionError) -> str:
    """A `${...}` that names a key the composed job lacks, as one paragraph."""
    reason = str(error).splitlines()[0].rstrip(".")
    if error.full_key == "data.block_size":  # conf/data/{tokens,text}.yaml: ${model.block_size}
        return (
            f"data.block_size could not be resolved ({reason}): language-model data (data=tokens, "
            "data=text) takes its window length from the model's block_size, and this model "
            "config has none. Train a model that reads token windows, e.g. model=gpt (or "
            "experiment=gpt_stdlib), or give your own model config a block_size."
        )
    return (
        f"{error.full_key} could not be resolved ({reason}): a ${{...}} interpolation, in conf/ or "
        "on the command line, names a key this job does not have."
    )


def compose_job(*overrides: str) -> dict[str, Any]:
    """The job `distrain <overrides>` would run, resolved like the CLI resolves it (for tests,
    benchmarks and notebooks that call `driver.train` themselves); a mistake in the overrides
    raises ConfigError with the CLI's paragraph."""
    register_configs()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return resolve(compose("config", overrides=list(overrides)))
    except Exception as error:  # a mistake in the overrides, named as the CLI names it
        message = config_errors.explain(error)
        if message is None:
            raise
        raise ConfigError(message) from error


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    hydra_cfg = HydraConfig.get()
    run_dir = RunDirectory(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return _run_sweep_job(cfg, run_dir)
    try:
        job = _checked(resolve(cfg))
        from distrain import driver

        metrics = driver.run(job, run_dir, overrides=list(hydra_cfg.overrides.task))
    except (ConfigError, TrainingFailed) as error:
        print(f"distrain: {_kind(error)}: {error}", file=sys.stderr)
        sys.exit(_exit_code(error))
    except KeyboardInterrupt as stop:
        _interrupted(stop, cfg.logger.progress)
    _finish(metrics, cfg.logger.progress)
    return metrics


def _checked(job: dict[str, Any]) -> config.Config:
    """The plain job checked (a mistake raises ConfigError) and typed, as `driver.train` does."""
    validation.validate(job)
    return config.typed(job)


def _interrupted(stop: KeyboardInterrupt, progress_mode: str) -> None:
    """Ctrl-C/SIGTERM: exit 130 with how to go on; a run that completed anyway is recorded."""
    if isinstance(stop, Interrupted) and stop.metrics is not None:
        _finish(stop.metrics, progress_mode)
    if isinstance(stop, Interrupted):
        print(f"distrain: interrupted: {stop}", file=sys.stderr)
    else:
        print("distrain: interrupted (no checkpoint written now)", file=sys.stderr)
    sys.exit(_exit_code(stop))


def _kind(error: BaseException) -> str:
    kind = next((name for cls, (name, _) in EXIT_CODES.items() if isinstance(error, cls)), None)
    return kind or f"unexpected error ({type(error).__name__})"


def _exit_code(error: BaseException) -> int:
    return next(code for cls, (_, code) in EXIT_CODES.items() if isinstance(error, cls))


def _run_sweep_job(cfg: DictConfig, run_dir: RunDirectory) -> dict[str, Any] | None:
    """One job of a --multirun sweep: skipped if it finished before, resumed if it has a
    checkpoint, else run. A failure is recorded in failed.json and the sweep goes on."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    label = f"job {hydra_cfg.job.num} ({' '.join(overrides) or 'no overrides'})"
    failed = run_dir.path / "failed.json"
    from distrain import driver, sweep

    try:
        job = resolve(cfg)
        action, earlier = sweep.plan(run_dir.path, overrides)
        if action == sweep.SKIP:
            print(f"distrain: {label}: skipped (finished) in {run_dir.path}", file=sys.stderr)
            return earlier
        failed.unlink(missing_ok=True)  # this attempt's outcome replaces the last one's
        if action == sweep.RESUME and job.get("resume") is None:
            job["resume"] = str(run_dir.path)
            print(f"distrain: {label}: resuming from its last checkpoint", file=sys.stderr)
        # One Ray for all the jobs, started (after the job's checks) by the first and kept.
        metrics = driver.run(_checked(job), run_dir, overrides=overrides, keep_cluster=True)
    except KeyboardInterrupt as stop:
        print(f"distrain: interrupted in {label}; the sweep stops here", file=sys.stderr)
        _interrupted(stop, cfg.logger.progress)
    except Exception as error:  # one bad job must not end the sweep; its run dir says why
        kind = _kind(error)
        record = {"error": f"{kind}: {error}", "overrides": overrides}
        if not isinstance(error, ConfigError | TrainingFailed):
            record["traceback"] = traceback.format_exc()
            traceback.print_exc()
        run_dir.write_json(failed, record)
        print(f"distrain: {label} failed: {kind}: {error}", file=sys.stderr)
        _job_exits.failed_sweep_jobs += 1
        return None
    _finish(metrics, cfg.logger.progress)
    return metrics


def _finish(metrics: dict[str, Any], progress_mode: str) -> None:
    """The run's summary table (metrics.json is already written, by the driver)."""
    from distrain.progress import print_summary

    print_summary(metrics, progress_mode)


class _JobExits:
    """Tells Hydra's own exits from a job's.

    The mistakes Hydra finds while composing (an unknown group option, a value of the wrong
    type or outside an enum, an unknown key) are raised to `main` and named by config_errors;
    the few it still reports itself (`--cfg job --package nope`) exit 1, the code of a failed
    training run. Anything leaving the job function is the job's own exit; an exit 1 with none
    is Hydra's report of a configuration mistake, and ends with distrain's code 2.
    A sweep goes on past a failed job (its run dir says why) and then exits with code 1.
    """

    def __init__(self) -> None:
        self.job_exited = False
        self.failed_sweep_jobs = 0  # a sweep with one is not a success, for scripts and CI

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.job_exited = True
            raise

    def code(self, exit_: SystemExit) -> Any:
        if exit_.code == 1 and not self.job_exited:
            return EXIT_CODES[ConfigError][1]
        return exit_.code


_job_exits = _JobExits()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    with _job_exits.job(), _interrupts.raised_here():
        metrics = _run(cfg)
    # Returned to Hydra so sweepers that optimise (e.g. Optuna) can read the objective.
    return None if metrics is None else metrics.get("val_loss")


class _DeferredInterrupts:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt only inside distrain's own code.

    While Hydra composes a job's config (before the first job, between two jobs of a sweep) the
    signal is recorded and raised as soon as distrain's code runs again, or when Hydra returns:
    a KeyboardInterrupt raised inside OmegaConf's flag handling leaves the config half-updated,
    and the sweep then ended with an AttributeError traceback and exit code 1 instead of 130.
    A scheduler's SIGTERM (pre-emption, scancel, kubectl delete) stops like Ctrl-C. While workers
    train, the driver's StopRequest (distrain/watch.py) takes both signals over.
    """

    def __init__(self) -> None:
        self.pending = False
        self._inside = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._inside:
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def raised_here(self) -> Iterator[None]:
        if self.pending:
            raise KeyboardInterrupt
        self._inside = True
        try:
            yield
        finally:
            self._inside = False


_interrupts = _DeferredInterrupts()


@contextlib.contextmanager
def _mistakes_raised() -> Iterator[bool]:
    """Hydra raises the mistakes it finds while composing instead of printing its own report
    (its HYDRA_FULL_ERROR switch), so `main` names them in one paragraph. Yields whether the
    user set the switch, asking for Hydra's report with its traceback instead."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield previous == "1"
    finally:
        os.environ.pop("HYDRA_FULL_ERROR")
        if previous is not None:
            os.environ["HYDRA_FULL_ERROR"] = previous


def main() -> None:
    if "--version" in sys.argv[1:] or sys.argv[1:] == ["-V"]:  # distrain's, not Hydra's
        print(versions.describe(CONF_DIR.parent))
        return None
    if sys.argv[1:2] == ["export"]:  # subcommands, not jobs: no Hydra
        from distrain.export import main as export_main

        return export_main(sys.argv[2:])
    if sys.argv[1:2] == ["sample"]:
        from distrain.sample import main as sample_main

        return sample_main(sys.argv[2:])
    register_configs()
    _interrupts.install()
    sys.argv = [sys.argv[0], *resume_command.resume_argv(sys.argv[1:])]
    try:
        with _mistakes_raised() as hydras_reports:
            _hydra_main()
        if _interrupts.pending:  # arrived after the last job, while Hydra wrapped up
            raise KeyboardInterrupt
    except SystemExit as exit_:
        sys.exit(_job_exits.code(exit_))
    except KeyboardInterrupt:
        # Between two jobs of a sweep (or while Hydra composes the next one) no job is running:
        # nothing to checkpoint, but the sweep stops like a Ctrl-C inside a job.
        sweeping = "--multirun" in sys.argv or "-m" in sys.argv
        where = "between jobs; the sweep stops here" if sweeping else "outside training"
        print(f"distrain: interrupted {where}", file=sys.stderr)
        sys.exit(EXIT_CODES[KeyboardInterrupt][1])
    except Exception as error:
        message = None if hydras_reports else config_errors.explain(error)
        if message is None:
            raise
        print(f"distrain: {EXIT_CODES[ConfigError][0]}: {message}", file=sys.stderr)
        sys.exit(EXIT_CODES[ConfigError][1])
    if _job_exits.failed_sweep_jobs:
        sys.exit(EXIT_CODES[TrainingFailed][1])


def entry() -> None:
    """The `distrain` command (and `python -m distrain`): `main`, then a quick exit.

    Once `main` is done (outputs written, Ray shut down, the exit code known) the interpreter's
    own teardown would spend about a second freeing the modules torch and Ray loaded; nothing in
    it is ours. So the exit handlers run (a sweep's kept Ray is released by one, logging is
    flushed by another) and the process then ends with `os._exit`. An unexpected exception
    still leaves the normal way, with its traceback. Tests call `main`, which returns.
    """
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_status(exit_.code)
    for thread in threading.enumerate():  # as the interpreter would: wait for non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit handlers, run as at a normal exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_status(code: object) -> int:
    """The process's exit status for `SystemExit(code)`, as Python's own exit makes it: None is 0,
    an int is itself, anything else is printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
