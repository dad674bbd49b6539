"""The `distrain` command and `python -m distrain`: a fork server started ahead, then the CLI.

The longest chain from the command to the first optimizer step is the fork server's imports
(torch, torch._dynamo, distrain: ~2.5 s of CPU, forked_workers.py). Started here, before this
process imports Hydra, composes and checks the job (~0.6 s), they begin at once, beside that
work, instead of after it. Only the command line is read to decide, so a job configured
otherwise in a file (a cluster address, `fork_workers: false`) starts one for nothing: the
driver stops it as soon as the job is typed (`forked_workers.stop_ahead`).
"""

from __future__ import annotations

import sys

from distrain import forked_workers

# Hydra's and distrain's flags that run no job.
NO_JOB_FLAGS = {
    "--help", "-h", "--hydra-help", "--version", "-V", "--cfg", "-c", "--info", "-i",
    "--shell-completion", "-sc",
}  # fmt: skip
NO_JOB_SUBCOMMANDS = {"export", "sample"}
NULLS = {"null", "none", "~", ""}


def main() -> None:
    if starts_embedded_ray(sys.argv[1:]):
        forked_workers.start_ahead()
    from distrain.cli import entry  # Hydra, omegaconf and the job's checks: ~0.3 s of imports

    entry()


def starts_embedded_ray(argv: list[str]) -> bool:
    """Whether a command line runs jobs on a Ray they start here whose workers are forked: not
    a subcommand or a flag that runs none, a cluster address, `cluster.fork_workers=false`, or
    a Hydra launcher (its jobs run in other processes)."""
    if set(argv[:1]) & NO_JOB_SUBCOMMANDS or NO_JOB_FLAGS.intersection(argv):
        return False
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "cluster.address" and value.strip().lower() not in NULLS:
            return False
        if key == "cluster.fork_workers" and value.strip().lower() in {"false", "0", "no", "off"}:
            return False
        if key == "hydra/launcher":
            return False
    return True


if __name__ == "__main__":
    main()
