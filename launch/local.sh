#!/usr/bin/env bash
# launch/local.sh: train on every GPU of this machine (or on its CPUs when it has none).
#
# Usage:
#   launch/local.sh [hydra overrides...]
#   launch/local.sh model=cnn data=mnist data.root=~/data trainer.epochs=20
#   launch/local.sh --multirun optimizer.lr=0.01,0.1      # any distrain argument passes through
#
# What it runs:
#   distrain trainer.workers=$N trainer.device=auto "$@"
# with N = the number of GPUs visible to this process, or, on a machine without GPUs,
# N = nproc / DISTRAIN_CPUS_PER_WORKER CPU workers (at least 1). Overrides given on the
# command line come after these two, so `launch/local.sh trainer.workers=2` still wins; flags
# such as --multirun are moved after all overrides, where Hydra accepts them.
# Ray runs embedded (cluster.address unset): nothing else to start.
#
# Environment knobs (all optional):
#   DISTRAIN_WORKERS=N            use exactly N workers, skip detection
#   DISTRAIN_CPUS_PER_WORKER=C    CPU-only machines: cores per worker (default 2, which leaves
#                                 cores for the driver and Ray's own processes)
#   DISTRAIN_DRY_RUN=1            print the command (shell-quoted, on stdout) instead of running it
#   PYTHON=python3                interpreter for `python -m distrain` when the `distrain`
#                                 console script is not on PATH
#   CUDA_VISIBLE_DEVICES          honoured: only the GPUs it lists are counted
#
# Outputs land in Hydra's run dir, outputs/<date>/<time>/ under the current directory.
set -euo pipefail

log() { printf 'local.sh: %s\n' "$*" >&2; }

# Number of GPUs this process may use; prints 0 when there is no usable NVIDIA GPU.
count_gpus() {
    local listed
    # `nvidia-smi -L` prints one "GPU <i>: <name> (UUID: ...)" line per physical GPU (MIG
    # slices appear as indented "MIG ..." lines and are not counted). A missing binary or a
    # driver that is not loaded both mean: no GPU.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
        return
    fi
    listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    listed=${listed:-0}
    # CUDA_VISIBLE_DEVICES narrows what CUDA (and so torch) can see; nvidia-smi ignores it.
    # Set but empty, or -1, hides every GPU.
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
            return
        fi
        local -a visible
        IFS=',' read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
        if ((${#visible[@]} < listed)); then
            listed=${#visible[@]}
        fi
    fi
    echo "$listed"
}

if [[ -n "${DISTRAIN_WORKERS:-}" ]]; then
    workers=$DISTRAIN_WORKERS
    log "$workers worker(s), from DISTRAIN_WORKERS"
else
    gpus=$(count_gpus)
    if ((gpus > 0)); then
        workers=$gpus
        log "$workers GPU worker(s) (one per visible GPU)"
    else
        cpus_per_worker=${DISTRAIN_CPUS_PER_WORKER:-2}
        if [[ ! "$cpus_per_worker" =~ ^[1-9][0-9]*$ ]]; then
            log "DISTRAIN_CPUS_PER_WORKER must be a positive integer, got '$cpus_per_worker'"
            exit 2
        fi
        # GNU nproc honours this process's CPU affinity, but also OMP_NUM_THREADS and
        # OMP_THREAD_LIMIT, which say nothing about the cores we may use: drop those two.
        cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
        workers=$((cores / cpus_per_worker))
        ((workers >= 1)) || workers=1
        log "no GPU found: $workers CPU worker(s) ($cores cores / $cpus_per_worker per worker)"
    fi
fi

if [[ ! "$workers" =~ ^[1-9][0-9]*$ ]]; then
    log "worker count must be a positive integer, got '$workers'"
    exit 2
fi

# Prefer the console script; fall back to the module (e.g. a source checkout on PYTHONPATH).
if command -v distrain >/dev/null 2>&1; then
    cmd=(distrain)
else
    cmd=("${PYTHON:-python3}" -m distrain)
fi
# Hydra's command line takes its overrides as one run of positional arguments, so
# `distrain trainer.workers=4 --multirun lr=0.1,1` would be rejected. Keep the caller's overrides
# (key=value) right after ours, where they win over ours, and move the caller's flags (--multirun,
# --cfg job, ...) with their values, in their order, to the end.
overrides=()
flags=()
for arg in "$@"; do
    if [[ "$arg" != -* && "$arg" == *=* ]]; then
        overrides+=("$arg")
    else
        flags+=("$arg")
    fi
done
cmd+=("trainer.workers=$workers" "trainer.device=auto" "${overrides[@]}" "${flags[@]}")

if [[ "${DISTRAIN_DRY_RUN:-0}" == "1" ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi

exec "${cmd[@]}"
