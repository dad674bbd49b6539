"""The real command line: `python -m distrain ...` in a subprocess, then its outputs read back."""

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import ray
import torch
from ray._private import ray_constants
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distrain import cli
from tests.conftest import (
    DISTRAIN,
    processes_mentioning,
    reap_processes_mentioning,
    run_cli,
    slowed,
)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.mark.slow
def test_train_through_the_cli_writes_metrics_and_tensorboard(
    ray_address: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        f"cluster.address={ray_address}",
        "trainer.workers=2",
        "trainer.epochs=3",
        "optimizer.lr=0.05",
        "logger.log_every_n_steps=5",
        # The same span of steps before a straggler is declared as the default's (3 intervals
        # of 10): with 5-step intervals, a busy shared machine makes short-lived stragglers
        # (README, "Stragglers"; a fresh clone's run reported 4 intervals of rank 1 at 9.4x while
        # the other test process took the cores). test_monitoring.py catches a slowed worker.
        "logger.straggler_patience=6",
        "trainer.eval_every_n_steps=10",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval at step 10 (epoch 1/3)  val_loss " in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "epochs",
        "steps",
        "workers",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "samples_per_s",
        "wall_s",
        "nodes",
    ):
        assert key in metrics, key
    steps_per_epoch = 1437 // 64  # digits: 1,797 samples, 20% held out, global batch 64
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * steps_per_epoch
    assert metrics["workers"] == 2 and len(metrics["nodes"]) == 2
    # A cluster is joined after the checks: its workers start with the group.
    assert metrics["workers_started"] == "with the group"
    assert metrics["val_accuracy"] > 0.9
    assert metrics["overrides"][0].startswith("cluster.address=")
    # Two workers with equal work: neither is reported slow at its own work (one slowed on
    # purpose shows 10-30x, test_monitoring.py). The suite's other process can starve one of
    # them of a core for the whole run (a fresh clone's run: rank 1 at 5.05x for 66 steps);
    # that report must say so: its extra time was spent waiting for a core.
    for report in metrics["stragglers"]:
        assert report["ratio"] < 3 or report["cause"] == "cpu_contention", report
    assert (run_dir / ".hydra" / "config.yaml").exists()

    series = scalars(run_dir)
    logged_steps = list(range(5, metrics["steps"] + 1, 5))
    if logged_steps[-1] != metrics["steps"]:
        logged_steps.append(metrics["steps"])  # the last step is always logged
    for tag in ("loss/train", "optim/lr", "throughput/samples_per_s"):
        assert [step for step, _ in series[tag]] == logged_steps, tag
    for tag in ("epoch/train_loss", "epoch/val_loss", "epoch/val_accuracy"):
        assert [step for step, _ in series[tag]] == [1, 2, 3], tag
    # Every evaluation on the step axis: every 10 steps inside an epoch, and each epoch's end
    # (steps 22, 44, 66), where it is the epoch's own figure.
    evaluated = dict(series["val/loss"])
    assert sorted(evaluated) == [10, 20, 22, 30, 40, 44, 50, 60, 66]
    for epoch, val_loss in series["epoch/val_loss"]:
        assert evaluated[epoch * steps_per_epoch] == pytest.approx(val_loss)
    assert len(series["val/accuracy"]) == len(evaluated)
    assert series["epoch/val_accuracy"][-1][1] == pytest.approx(metrics["val_accuracy"])
    assert series["optim/lr"][0][1] == pytest.approx(0.05)
    # The best checkpoint: of the evaluated steps that have a checkpoint (the epoch ends here,
    # not steps 10, 20, ...), the one of the lowest val loss.
    checkpointed = {step: evaluated[step] for step in (22, 44, 66)}
    best_step = min(checkpointed, key=checkpointed.__getitem__)
    best = metrics["checkpoints"]["best"]
    assert best["step"] == best_step, (best, evaluated)
    assert best["val_loss"] == pytest.approx(checkpointed[best_step])
    assert (run_dir / "checkpoints" / "best").read_text() == f"step-{best_step:09d}"
    assert f"step {best_step}, val loss {best['val_loss']:.4f} (its weights: distrain export" in (
        result.stderr
    )


@pytest.mark.slow
def test_early_stopping_ends_the_run_as_done_at_a_boundary(
    ray_address: str, tmp_path: Path
) -> None:
    """At lr 0.3 the default job's val loss climbs after a few epochs: with patience 2 the run
    stops at an epoch end well before its 10, exits 0 and keeps the best checkpoint."""
    run_dir = tmp_path / "run"
    result = run_cli(
        f"cluster.address={ray_address}",
        "optimizer.lr=0.3",
        "trainer.early_stopping_patience=2",
        "logger.progress=plain",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=slowed(0, 0.02),  # 20 ms a step: the driver keeps up with the epochs' figures
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    early = metrics["early_stopped"]
    assert early["step"] == metrics["steps"] < 220 and early["step"] % 22 == 0, early
    assert (run_dir / "model.pt").is_file()
    # The rule, on the epochs' val losses as TensorBoard has them: the best, then 2 no lower.
    losses = dict(scalars(run_dir)["epoch/val_loss"])
    best_epoch = min(losses, key=losses.__getitem__)
    after = [epoch * 22 for epoch in sorted(losses) if epoch > best_epoch][:2]
    assert (
        f"(step {best_epoch * 22}) in the 2 evaluations after it (steps {after[0]}, "
        in (early["reason"])
    )
    assert metrics["checkpoints"]["best"]["step"] == best_epoch * 22
    assert "early stopping: no val loss below" in result.stderr
    assert "early stopped:        at step" in result.stderr

    # Resumed, the run still counts the evaluations before its checkpoint (they travel in it):
    # the same rule holds at once, so it stops at its first boundary, and its best checkpoint
    # is still the one before the resume, not the first one written after it.
    resumed = run_cli(
        f"resume={run_dir}", f"cluster.address={ray_address}", cwd=tmp_path, env=slowed(0, 0.02)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["early_stopped"]["reason"] == early["reason"]
    assert early["step"] < again["early_stopped"]["step"] < 220
    assert again["checkpoints"]["best"]["step"] == best_epoch * 22
    assert (run_dir / "checkpoints" / "best").read_text() == f"step-{best_epoch * 22:09d}"


BAD_INPUT = {
    "unknown group option": (
        ["model=transformer_xxl"],
        "model=transformer_xxl: there is no model config named 'transformer_xxl'. "
        "The choices: cnn, gpt, mlp, resnet18, rnn.",
    ),
    "misspelt experiment": (  # an optional group would silently run the default job instead
        ["experiment=gpt_stdlb"],
        "there is no experiment config named 'gpt_stdlb' (did you mean experiment=gpt_stdlib?)",
    ),
    "misspelt key": (
        ["trainer.wrokers=2"],
        "trainer.wrokers: the job has no such key (did you mean trainer.workers?). "
        "trainer has: workers, epochs,",
    ),
    "misspelt key added with +": (  # Hydra adds it; the typed schema refuses it
        ["+trainer.wrokers=2"],
        "trainer.wrokers: the job has no such key (did you mean trainer.workers?)",
    ),
    "wrong type": (["trainer.workers=two"], "trainer.workers=two: 'two' is not a whole number."),
    "value outside the choices": (
        ["logger.progress=fancy"],
        "logger.progress=fancy is not one of auto, rich, plain, none.",
    ),
    "unreadable override": (["trainer.workers=[1,"], "the command line could not be read"),
    "negative lr": (["optimizer.lr=-0.1"], "optimizer.lr=-0.1"),
    "zero workers": (["trainer.workers=0"], "trainer.workers=0"),
    "negative workers": (["trainer.workers=-1"], "trainer.workers=-1"),
    "batch not divisible": (["trainer.workers=3", "data.batch_size=64"], "cannot be split evenly"),
    "unreachable address": (["cluster.address=127.0.0.1:9"], "is unreachable"),
    # conf/data/tokens.yaml's window is ${model.block_size}, which the default MLP lacks.
    "token data without a language model": (
        ["data=tokens", "data.path=/data/owt"],
        "data.block_size could not be resolved (Interpolation key 'model.block_size' not found)"
        ": language-model data (data=tokens, data=text) takes its window length from the model",
    ),
    "interpolation of a missing key": (
        ["trainer.seed=${nope.x}"],
        "could not be resolved (Interpolation key 'nope.x' not found)",
    ),
    "bad address": (["cluster.address=nohost"], "is not a Ray address"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_fast_with_one_clear_message(case: str, tmp_path: Path) -> None:
    """Each mistake is named before any Ray or actor starts: the job points at an address
    where nothing listens, so reaching the cluster would fail with another message."""
    overrides, message = BAD_INPUT[case]
    if not any(o.startswith("cluster.address=") for o in overrides):
        overrides = [*overrides, "cluster.address=127.0.0.1:9"]
    started = time.monotonic()
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout_s=90)
    assert result.returncode == 2, result.stderr  # found by Hydra or by distrain: the same code
    assert message in result.stderr, result.stderr
    if case != "unreachable address":
        assert "is unreachable" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # One paragraph: no report of Hydra's own (its search path, its HYDRA_FULL_ERROR hint).
    assert result.stderr.strip().startswith("distrain: configuration error: "), result.stderr
    assert "\n" not in result.stderr.strip(), result.stderr
    assert time.monotonic() - started < 60


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` run by this environment's Python in a new process, output captured."""
    return subprocess.run(
        [DISTRAIN[0], "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_a_config_mistake_is_named_before_torch_and_ray_are_imported(tmp_path: Path) -> None:
    """The CLI checks the job before it imports the driver: a mistake costs a fraction of a
    second, not the ~2 s of importing torch and Ray."""
    code = (  # `main`: the command's own entry ends the process before anything can look
        "import sys\n"
        "sys.argv = ['distrain', 'trainer.workers=0', 'hydra.run.dir=.']\n"
        "from distrain.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit_:\n"
        "    print(exit_.code, 'torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    result = _python(code, tmp_path)
    assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr
    assert "trainer.workers=0 is not allowed" in result.stderr


def test_the_command_exits_with_its_code_after_the_exit_handlers(tmp_path: Path) -> None:
    """`distrain` ends with os._exit (skipping the interpreter's teardown), but only after the
    exit handlers ran (a sweep's kept Ray is released by one) and with the job's exit code;
    output written without a newline is not lost."""
    code = (
        "import atexit, sys\n"
        "from distrain import cli\n"
        "atexit.register(lambda: print('handler ran', end=''))\n"
        "sys.argv = ['distrain', 'trainer.workers=0', 'hydra.run.dir=.']\n"
        "cli.entry()\n"
        "print('not reached')\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "handler ran"
    assert "trainer.workers=0 is not allowed" in result.stderr


@pytest.mark.parametrize(
    ("code", "status", "printed"), [(None, 0, ""), (3, 3, ""), ("bad", 1, "bad")]
)
def test_exit_status_is_what_python_makes_of_system_exit(
    code: object, status: int, printed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.exit_status(code) == status
    assert capsys.readouterr().err.strip() == printed


def test_more_workers_than_the_cluster_holds(ray_address: str, tmp_path: Path) -> None:
    result = run_cli(
        f"cluster.address={ray_address}",
        "trainer.workers=16",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=90,
    )
    assert result.returncode == 2
    assert "trainer.workers=16 needs 16 CPUs" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # The error is all there is: no training header before it, no TensorBoard run left behind.
    assert "training:" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_hydra_flags_work(tmp_path: Path) -> None:
    result = run_cli("--cfg", "job", "trainer.workers=3", cwd=tmp_path, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert "workers: 3" in result.stdout


def test_help_and_version_are_distrains(tmp_path: Path) -> None:
    """`--help` starts with distrain's usage (its subcommands, how to resume and sweep), then
    Hydra's groups and the job; `--version` is distrain's and its stack's, not Hydra's alone."""
    shown = run_cli("--help", "trainer.workers=3", cwd=tmp_path, timeout_s=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("distrain: distributed mini-batch training"), shown.stdout[:300]
    for usage in ("distrain export RUN_DIR", "distrain sample RUN_DIR", "resume=RUN_DIR"):
        assert usage in shown.stdout
    assert "aggregator: allreduce, fsdp, parameter_server" in shown.stdout  # Hydra's groups
    assert "workers: 3" in shown.stdout  # and the job as composed with the overrides
    assert "powered by Hydra" not in shown.stdout
    versions = run_cli("--version", cwd=tmp_path, timeout_s=60)
    assert versions.returncode == 0, versions.stderr
    first, second = versions.stdout.splitlines()
    assert first.startswith(f"distrain {importlib.metadata.version('distrain')}"), first
    for package in (
        f"torch {torch.__version__},",  # with its build tag (+cu130), which the metadata lacks
        f"ray {ray.__version__}",
        f"hydra-core {hydra.__version__}",
    ):
        assert package in second, second


def test_shell_completion_offers_keys_and_group_options(tmp_path: Path) -> None:
    """The Tab completion `--help` advertises (Hydra's), answered through distrain's entry."""
    for line, expected in [
        ("distrain trainer.wor", "trainer.workers="),
        ("distrain experiment=gpt", "experiment=gpt2_small experiment=gpt_stdlib"),
    ]:
        result = run_cli("-sc", "query=bash", cwd=tmp_path, timeout_s=60, env={"COMP_LINE": line})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == expected.split(), result.stdout


@pytest.mark.slow  # an embedded Ray starts: ~10 s
@pytest.mark.parametrize(
    # 12 s: both workers' processes start within it even under load (8 s once saw one).
    "check_delay_s",
    ["0", "12"],
    ids=["while_ray_starts", "after_its_workers_started"],
)
def test_a_mistake_only_the_build_finds_ends_the_embedded_ray(
    tmp_path: Path, check_delay_s: str
) -> None:
    """The default path: the job is checked while its embedded Ray starts, and the workers start
    as soon as Ray is up, while the dry build still runs (early_start.py). A mistake only the
    build finds (the data's) still ends the run with one message and exit 2, and the Ray that
    was starting meanwhile goes with it, and so do those workers when the build was slower than
    Ray's start (here made so: DISTRAIN_SLOW_CHECK_S)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))  # see the Ctrl-C test below
    result = run_cli(
        "data.val_fraction=1.5",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=90,
        env={"RAY_TMPDIR": str(ray_tmp), "DISTRAIN_SLOW_CHECK_S": check_delay_s},
    )
    assert result.returncode == 2, result.stderr
    assert "data.val_fraction must be in (0, 1), got 1.5" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert any(ray_tmp.iterdir()), "no Ray was started: the test shows nothing"
    if check_delay_s != "0":
        # The workers had started: Ray writes each actor's class into its process's output.
        outputs = list(ray_tmp.glob("ray/session_[0-9]*/logs/worker-*.out"))
        started = [path for path in outputs if ":actor_name:Worker" in path.read_text()]
        assert len(started) == 2, [path.read_text() for path in outputs]
    assert reap_processes_mentioning(str(ray_tmp), timeout_s=20) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_leaves_no_ray_behind(tmp_path: Path) -> None:
    """The real default path: an embedded Ray started by the command, then SIGINT mid-training."""
    # A Ray temp dir of our own, so its processes are recognisable; short, as Ray's unix socket
    # paths inside it must stay under 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))
    # Ray's default dashboard-agent port taken, as by another Ray on this machine (or by this
    # one already): the embedded Ray's agent must not wait for it (ray_startup.py).
    with _port_taken(ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT):
        proc = subprocess.Popen(
            [
                *DISTRAIN,
                "trainer.epochs=1000",
                "logger.progress=plain",
                f"hydra.run.dir={tmp_path}",
            ],
            cwd=tmp_path,
            env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = _lines_until(proc, "epoch 2/")
            # A newcomer's default run prints nothing they must learn to ignore.
            assert not any("authentication" in line.lower() for line in lines), "".join(lines)
            assert processes_mentioning(str(ray_tmp)), "".join(lines)
            # The workers were forked by the job's fork server (forked_workers.py): one server,
            # each worker's client (fork_client.py) beside it.
            fork_processes = processes_mentioning(f"distrain-fork-{proc.pid}-")
            servers = set(processes_mentioning("forked_workers import serve"))
            assert len(servers.intersection(fork_processes)) == 1, fork_processes
            assert len(fork_processes) >= 3, fork_processes
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=60)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    # The embedded Ray's workers started while the job was checked (early_start.py).
    workers = json.loads((tmp_path / "workers.json").read_text())
    assert workers["started"] == "early, while the job was checked", workers
    assert [w["forked"] for w in workers["workers"]] == [True, True], workers
    assert reap_processes_mentioning(str(ray_tmp), timeout_s=20) == []
    assert reap_processes_mentioning(f"distrain-fork-{proc.pid}-", timeout_s=5) == []
    # Nor did Ray's dashboard agent run (the port it found taken once cost 3.4 s): the idle one
    # stood in (ray_startup.py, idle_agent.py) and said none of its ports is in use.
    assert not list(ray_tmp.glob("ray/session_[0-9]*/logs/dashboard_agent.*"))
    (listen_port,) = ray_tmp.glob("ray/session_[0-9]*/dashboard_agent_listen_port_*")
    assert listen_port.read_text() == "-1"
    # Nor did Ray start its dashboard process (and wait for it) for an embedded Ray.
    assert not list(ray_tmp.glob("ray/session_[0-9]*/logs/dashboard.*"))
    shutil.rmtree(ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def _port_taken(port: int) -> Iterator[None]:
    """`port` listened on for the block, by this test or (already) by another process."""
    with socket.socket() as listener:
        with contextlib.suppress(OSError):  # taken already: the same for the test
            listener.bind(("0.0.0.0", port))
            listener.listen()
        yield


def _lines_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    """`proc`'s stderr lines up to the first that starts with `prefix` (or its end)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines
