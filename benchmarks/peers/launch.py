"""Run peer baselines in fresh subprocesses and collect their JSON lines.

`python benchmarks/peers/launch.py --out FILE` runs every baseline on every workload once.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
PEERS = ("textbook", "inmemory", "torchrun_ddp", "ray_train", "ray_ps")
SINGLE_PROCESS = ("textbook", "inmemory")


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def run_torchrun(args: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run torchrun_ddp.py under torchrun with `--workers N` processes; `args` are its CLI args.

    `--t0` is set to the launch time, so time_to_first_step_s includes torchrun's start-up.
    """
    workers = args[args.index("--workers") + 1] if "--workers" in args else "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={workers}",
        str(PEERS_DIR / "torchrun_ddp.py"),
        *args,
        "--t0",
        repr(time.time()),
    ]
    return _run(cmd, timeout)


def run_peer(name: str, timeout: float = 600, **args: Any) -> dict[str, Any]:
    """Run baseline `name` in a fresh process and return its JSON result as a dict.

    Keyword args are the scripts' CLI options with underscores (workload="cnn", workers=2,
    batch_per_worker=64, warmup_steps=20, measure_steps=30, threads_per_worker=1, seed=0).
    Raises RuntimeError with the stderr tail if the run fails.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
    cli: list[str] = []
    for key, value in args.items():
        if value is not None:
            cli += [f"--{key.replace('_', '-')}", str(value)]
    if name == "torchrun_ddp":
        return run_torchrun(cli, timeout)
    # The caller's launch time as t0, so interpreter start-up and imports count for every peer.
    return _run(
        [sys.executable, str(PEERS_DIR / f"{name}.py"), *cli, "--t0", repr(time.time())], timeout
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="JSONL file to append results to")
    p.add_argument("--workers", type=int, default=2, help="for the multi-process peers")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--measure-steps", default="digits_mlp=100,mlp6m=30,cnn=30")
    p.add_argument("--peers", default=",".join(PEERS))
    a = p.parse_args()
    measure = dict(kv.split("=") for kv in a.measure_steps.split(","))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for workload, steps in measure.items():
        for name in a.peers.split(","):
            row = run_peer(
                name,
                workload=workload,
                workers=1 if name in SINGLE_PROCESS else a.workers,
                warmup_steps=a.warmup_steps,
                measure_steps=int(steps),
            )
            print(json.dumps(row), flush=True)
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
