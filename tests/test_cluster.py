"""distrain joining a real two-node Ray cluster on this machine, and the cluster errors.

The cluster is `ray.cluster_utils.Cluster` (a head and a second node, each with its own raylet,
object store and worker processes) hosted by a separate Python process. That process runs from a
throwaway venv whose Python sees the main venv's packages (torch, Ray, Hydra) but not distrain,
so the worker processes both nodes start cannot import distrain unless the job ships it: what a
real cluster without the package installed looks like, as far as one machine can show it.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TWO_WORKER_JOB, reap_processes_mentioning, run_cli

# Runs in the no-distrain venv: starts the two nodes, reports them, waits for stdin to close.
# The second node gets a temp dir of its own, as a second host has its own disk: with a shared
# one, its runtime-env agent deletes and unpacks again the working_dir the head's processes run
# in, and a process whose working directory was deleted aborts on `import torch` ("Intel oneMKL
# FATAL ERROR: Cannot load .../libtorch_cpu.so", reproduced with a plain chdir + rmdir). That
# killed the Ray Client server in CI: the job's first `ray.put` of tensors imports torch there.
HOST = """
import json, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "include_dashboard": False, "ray_client_server_port": int(sys.argv[1]),
    "dashboard_agent_listen_port": 0})  # Ray's default port may be another Ray's
cluster.add_node(num_cpus=2, temp_dir=sys.argv[2])
cluster.wait_for_nodes()
nodes = [n.node_id for n in [cluster.head_node, *cluster.worker_nodes]]
print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""
JOB = TWO_WORKER_JOB


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _venv_without_distrain(root: Path) -> Path:
    """A venv whose site-packages points at this venv's packages through a plain path entry.

    A path in a .pth file is added to sys.path but the .pth files inside it are not run, so
    setuptools' editable-install finder (a .pth hook) never loads and distrain is not importable.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix) / "bin" / version
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(root)], check=True)
    pth = root / "lib" / version / "site-packages" / "main-venv.pth"
    pth.write_text("\n".join(site.getsitepackages()))
    return root / "bin" / "python"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("nodes")
    python = _venv_without_distrain(root / "venv")
    probe = subprocess.run(
        [str(python), "-c", "import ray, torch, hydra; import distrain"],
        cwd=root,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    # The premise of the runtime-environment test: these nodes' Python cannot import distrain.
    assert "No module named 'distrain'" in probe.stderr, probe.stderr
    # A Ray temp dir of our own: short (Ray's socket paths must stay under 107 bytes), and its
    # path in every process's command line tells us which processes are this cluster's.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dt2-", dir="/tmp"))
    client_port = _free_port()
    host = subprocess.Popen(
        [str(python), "-c", HOST, str(client_port), str(ray_tmp / "node2")],
        cwd=root,
        env=_clean_env(RAY_TMPDIR=str(ray_tmp)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = host.stdout.readline()  # blocks until both nodes are up (or the host died)
        assert line, f"the cluster host exited with {host.wait()}"
        info = json.loads(line)
        host_ip = info["address"].rpartition(":")[0]
        yield {**info, "client": f"ray://{host_ip}:{client_port}", "ray_tmp": ray_tmp}
    finally:
        host.stdin.close()
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
        leftover = reap_processes_mentioning(str(ray_tmp), timeout_s=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert leftover == [], f"cluster processes left behind: {leftover}"


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.cluster
def test_two_nodes_spread_trains_like_one_node(
    two_nodes: dict[str, Any], one_node_run: Path, tmp_path: Path
) -> None:
    """SPREAD puts the two workers on the two nodes, the code travels in the runtime env, and
    the result is the single-node run's: the same data order and the same averaged gradients."""
    spread = run_cli(
        f"cluster.address={two_nodes['address']}",
        "cluster.placement=SPREAD",
        "cluster.runtime_env_working_dir=true",
        *JOB,
        f"hydra.run.dir={tmp_path / 'two'}",
        cwd=tmp_path,
    )
    assert spread.returncode == 0, spread.stderr[-3000:]

    two, one = _metrics(tmp_path / "two"), _metrics(one_node_run)
    assert sorted(two["nodes"]) == sorted(two_nodes["nodes"])  # one worker on each node
    assert len(set(one["nodes"])) == 1
    assert two["steps"] == one["steps"] == 2 * (1437 // 64)
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=1e-9)
    params_two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    params_one = torch.load(one_node_run / "model.pt", weights_only=True)
    assert params_two.keys() == params_one.keys()
    # Bitwise: the same float operations in the same order, only on other nodes.
    for name, value in params_one.items():
        assert torch.equal(params_two[name], value), name


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_client_address_runs_the_job(two_nodes: dict[str, Any], tmp_path: Path) -> None:
    """ray://host:port (Ray Client): the driver stays here; the client server on the head, which
    cannot import distrain either, gets it from the runtime env like the workers."""
    result = run_cli(
        f"cluster.address={two_nodes['client']}",
        "cluster.placement=STRICT_SPREAD",
        "cluster.runtime_env_working_dir=true",
        *JOB,
        "trainer.epochs=1",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path)
    assert sorted(metrics["nodes"]) == sorted(two_nodes["nodes"])
    assert metrics["steps"] == 1437 // 64
    assert metrics["val_accuracy"] > 0.3  # it learned (chance: 0.1); one epoch of a small MLP


@pytest.mark.cluster
def test_nodes_without_distrain_fail_with_the_remedy(
    two_nodes: dict[str, Any], tmp_path: Path
) -> None:
    """The control for the runtime-env path: without cluster.runtime_env_working_dir the same
    nodes cannot start a worker, so the runs above got distrain from the runtime env.

    What one machine cannot show: a node on another filesystem. Ray also puts the driver's
    working directory on the workers' sys.path; the CLI runs from a temporary directory, so that
    path does not provide distrain either.
    """
    result = run_cli(
        f"cluster.address={two_nodes['address']}",
        *JOB,
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "the cluster's nodes cannot import distrain" in result.stderr, result.stderr[-3000:]
    assert "cluster.runtime_env_working_dir=true" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["cluster.placement=STRICT_SPREAD", "trainer.workers=3", "data.batch_size=63"],
            "cluster.placement=STRICT_SPREAD puts each of trainer.workers=3 workers on its own "
            "node, but the cluster has 2 node(s)",
        ),
        (
            ["trainer.device=cuda", "trainer.workers=2"],
            "trainer.workers=2 needs 2 GPUs (1 per worker, trainer.device), but the Ray cluster "
            "has 0 available (0 in total on 2 node(s))",
        ),
        (
            ["trainer.workers=5", "data.batch_size=60"],
            "trainer.workers=5 needs 5 CPUs (1 per worker, trainer.cpus_per_worker), but the Ray "
            "cluster has 4 available (4 in total on 2 node(s))",
        ),
    ],
    ids=["strict-spread", "gpus", "cpus"],
)
def test_more_than_the_cluster_has_fails_fast(
    two_nodes: dict[str, Any], tmp_path: Path, overrides: list[str], message: str
) -> None:
    started = time.monotonic()
    result = run_cli(
        f"cluster.address={two_nodes['address']}",
        *overrides,
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr.replace("\n", " "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # joining plus the check; never a wait for resources


@pytest.fixture
def autoscaler_record(two_nodes: dict[str, Any]) -> Iterator[None]:
    """The cluster config Ray's autoscaler publishes in the GCS: one GPU node type, 0 to 2 nodes.

    Written by the test: a real autoscaler needs a cloud, and Ray's fake-provider
    AutoscalingCluster shuts down with `ray stop --force`, which would end every Ray on this
    shared machine. The GCS and Ray's reader of the record are the real ones.
    """
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY as KEY
    from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE as NAMESPACE
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-worker", min_count=0, max_count=2)
    group.resources.update({"CPU": 4, "GPU": 1})
    head = config.node_group_configs.add(name="head", min_count=1, max_count=1)
    head.resources.update({"CPU": 2})
    gcs = GcsClient(address=two_nodes["address"])
    gcs.internal_kv_put(
        KEY.encode(), config.SerializeToString(), overwrite=True, namespace=NAMESPACE.encode()
    )
    try:
        yield
    finally:
        gcs.internal_kv_del(KEY.encode(), False, NAMESPACE.encode())


@pytest.mark.cluster
def test_gpus_beyond_what_the_autoscaler_may_add_fail_fast(
    two_nodes: dict[str, Any], autoscaler_record: None, tmp_path: Path
) -> None:
    result = run_cli(
        f"cluster.address={two_nodes['address']}",
        "trainer.device=cuda",
        "trainer.workers=4",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "trainer.workers=4 needs 4 GPUs (1 per worker, trainer.device), but the Ray cluster has "
        "0 available (0 in total on 2 node(s); its autoscaler may grow it to 2)"
    ) in result.stderr.replace("\n", " "), result.stderr[-3000:]


@pytest.mark.cluster
def test_gpus_the_autoscaler_may_add_are_waited_for_within_a_bound(
    two_nodes: dict[str, Any], autoscaler_record: None, tmp_path: Path
) -> None:
    """Within the autoscaler's limits the job waits (here nothing comes: no real autoscaler
    runs) for cluster.scale_up_timeout_s, then says what is available."""
    started = time.monotonic()
    result = run_cli(
        f"cluster.address={two_nodes['address']}",
        "trainer.device=cuda",
        "trainer.workers=2",
        "cluster.scale_up_timeout_s=4",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=120,
    )
    elapsed_s = time.monotonic() - started
    stderr = result.stderr.replace("\n", " ")
    assert result.returncode == 2, result.stderr[-3000:]
    # A warning through logging: Hydra's job logging prints it on stdout (and in the run's log).
    assert "waiting up to 4 s (cluster.scale_up_timeout_s) for its autoscaler" in result.stdout
    assert "could not place 2 workers of {'CPU': 1.0, 'GPU': 1.0}" in stderr, stderr[-3000:]
    assert "the autoscaler did not add the nodes in time" in stderr
    assert elapsed_s >= 4


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_address_fails_in_seconds(scheme: str, tmp_path: Path) -> None:
    port = _free_port()  # bound and released: nothing listens there now
    started = time.monotonic()
    result = run_cli(
        f"cluster.address={scheme}127.0.0.1:{port}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout_s=90,
    )
    assert result.returncode == 2
    assert f"cluster.address='{scheme}127.0.0.1:{port}' is unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_an_address_that_is_not_ray_fails_in_seconds(tmp_path: Path) -> None:
    """A port that accepts TCP but is not Ray's (here a bare listening socket; in real life often
    the dashboard's 8265): ray.init would wait for minutes, distrain says so in seconds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = run_cli(
            f"cluster.address=127.0.0.1:{port}",
            "cluster.connect_timeout_s=3",
            f"hydra.run.dir={tmp_path}",
            cwd=tmp_path,
            timeout_s=90,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "accepts connections but does not answer as Ray" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
