"""The benchmark report: per workload a table of medians with their spread, the targets as
ratios of medians with the spread of the per-round ratios, the machine, and a chart.

`runs` are single runs (one dict per fresh process) carrying `round`; rows are grouped by
(workload, name, workers). A target pair ran alternately in the same rounds, so round i's A is
divided by round i's B; a system that ran once is compared with every run of the other side.
"""

import json
import statistics
from pathlib import Path
from typing import Any

REFERENCE = "torchrun_ddp"
PS_PEER = "ray_ps"
PS_OURS = "distrain_ps_sync"
PS_TARGET = 2.0  # parameter_server (sync, 2 workers, 2 servers) >= 2x Ray's docs PS
ONE_WORKER_TARGET = 0.95  # distrain x1 >= 0.95x the in-memory loop
ACCURACY_MARGIN = 0.005  # fp16/bf16 within 0.5 points of no compression


def _runs(runs: list[dict], workload: str, name: str, workers: int) -> list[dict]:
    return [
        r
        for r in runs
        if r["workload"] == workload
        and r["name"] == name
        and r["workers"] == workers
        and "error" not in r
    ]


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def round_ratios(a: list[dict], b: list[dict], key: str) -> list[float]:
    """a/b of `key` round by round when both ran in the same rounds; else every pairing (a row
    that ran once against every run of the other side: the spread is the other side's)."""
    if _same_rounds(a, b):
        by_round = {r.get("round"): r[key] for r in b}
        return [r[key] / by_round[r.get("round")] for r in a]
    return [x[key] / y[key] for x in a for y in b]


def _same_rounds(a: list[dict], b: list[dict]) -> bool:
    rounds = [r.get("round") for r in b]
    return len(set(rounds)) == len(rounds) and {r.get("round") for r in a} == set(rounds)


def verdict(ratios: list[float], target: float, *, lower_is_better: bool = False) -> str:
    """'met' / 'NOT met' when every per-round ratio is on one side of the target, else undecided."""
    low, high = min(ratios), max(ratios)
    good, bad = (
        (high <= target, low > target) if lower_is_better else (low >= target, high < target)
    )
    if good:
        return "met"
    return "NOT met" if bad else "within the spread (undecided)"


def _spread(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return "1 run"
    return f"{min(values):{fmt}}–{max(values):{fmt}}"


def _groups(runs: list[dict], workload: str) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["name"], r["workers"]) for r in runs if r["workload"] == workload))


def _table(runs: list[dict], workload: str, workers: int) -> list[str]:
    ref = _runs(runs, workload, REFERENCE, workers)
    lines = [
        f"### {workload}",
        "",
        "| system | workers | samples/s (median) | min–max | runs | × torchrun DDP "
        "| first step (s) | peak RSS (MB) | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n in _groups(runs, workload):
        done = _runs(runs, workload, name, n)
        failed = sum(
            1 for r in runs if r["workload"] == workload and (r["name"], r["workers"]) == (name, n)
        ) - len(done)
        if not done:
            lines.append(f"| {name} | {n} | failed: see the .jsonl | | {failed} | | | | |")
            continue
        rates = [r["samples_per_s"] for r in done]
        rate = _median(done, "samples_per_s")
        ratio = f"{rate / _median(ref, 'samples_per_s'):.2f}" if ref else "–"
        count = f"{len(done)}" + (f" (+{failed} failed)" if failed else "")
        lines.append(
            f"| {name} | {n} | {rate:,.0f} | {_spread(rates, ',.0f')} | {count} | {ratio} "
            f"| {_median(done, 'time_to_first_step_s'):.1f} "
            f"| {max(r['peak_rss_mb'] for r in done):,.0f} | {_median(done, 'final_loss'):.4f} |"
        )
    return [*lines, ""]


def versus(
    runs: list[dict],
    workload: str,
    ours: tuple[str, int],
    theirs: tuple[str, int],
    target: float,
    key: str = "samples_per_s",
) -> str | None:
    """One target line: median ours / median theirs of `key` (a `time_...`: lower is better)."""
    a, b = _runs(runs, workload, *ours), _runs(runs, workload, *theirs)
    if not (a and b):
        return None
    ratio, is_time = _median(a, key) / _median(b, key), key.startswith("time_")
    per_round = round_ratios(a, b, key)
    what = "time to first step" if is_time else "samples/s"
    sign = "≤" if is_time else "≥"
    how = "per round" if _same_rounds(a, b) else "over every pairing of runs"
    spread = (
        f"{how} {_spread(per_round, '.2f')}, {len(per_round)} pairs"
        if len(per_round) > 1
        else "one pair: no spread"
    )
    return (
        f"* {workload}: {what} of {ours[0]} ×{ours[1]} / {theirs[0]} ×{theirs[1]} = "
        f"**{ratio:.2f}×** ({spread}; target {sign} {target:g}×: "
        f"{verdict(per_round, target, lower_is_better=is_time)})"
    )


def _targets(runs: list[dict], workers: int) -> list[str]:
    lines = ["## Targets", ""]
    ours_1, ours_w = ("distrain_allreduce", 1), ("distrain_allreduce", workers)
    for workload in dict.fromkeys(r["workload"] for r in runs):
        checks = [
            (ours_1, ("inmemory", 1), ONE_WORKER_TARGET, "samples_per_s"),
            (ours_w, (REFERENCE, workers), 1.0, "samples_per_s"),
            # From the command to the first step: no slower than torchrun ("start in seconds").
            (ours_w, (REFERENCE, workers), 1.0, "time_to_first_step_s"),
            (ours_w, ("textbook", 1), 1.0, "samples_per_s"),  # digits: distributing must pay
            ((PS_OURS, workers), (PS_PEER, workers), PS_TARGET, "samples_per_s"),
            (ours_w, ("ray_train", workers), 1.0, "samples_per_s"),
            (ours_w, ("ray_train", workers), 0.5, "time_to_first_step_s"),
        ]
        for ours, theirs, target, key in checks:
            line = versus(runs, workload, ours, theirs, target, key)
            if line:
                lines.append(line)
    return [*lines, ""]


def _compression(compression: list[dict]) -> list[str]:
    if not compression:
        return []
    base = next(c for c in compression if c["compression"] == "none")
    lines = [
        "| compression | bytes all-reduced / step / worker | ratio | val accuracy | Δ points |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in compression:
        delta = 100 * (c["val_accuracy"] - base["val_accuracy"])
        lines.append(
            f"| {c['compression']} | {c['bytes_per_step']:,.0f} "
            f"| {c['bytes_per_step'] / base['bytes_per_step']:.3f} "
            f"| {100 * c['val_accuracy']:.2f} % | {delta:+.2f} |"
        )
    for c in compression[1:]:
        halved = c["bytes_per_step"] <= 0.5 * base["bytes_per_step"]
        close = abs(c["val_accuracy"] - base["val_accuracy"]) <= ACCURACY_MARGIN
        lines.append(
            f"* {c['compression']}: bytes halved: {'yes' if halved else 'NO'}; accuracy "
            f"within {100 * ACCURACY_MARGIN:g} points: {'yes' if close else 'NO'}"
        )
    return [*lines, ""]


def _chart(runs: list[dict], path: Path) -> None:
    import matplotlib  # here, so the tables and verdicts need no plotting library

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        groups = [g for g in _groups(runs, workload) if _runs(runs, workload, *g)]
        rates = [[r["samples_per_s"] for r in _runs(runs, workload, *g)] for g in groups]
        medians = [statistics.median(x) for x in rates]
        errors = [
            [m - min(x) for m, x in zip(medians, rates)],
            [max(x) - m for m, x in zip(medians, rates)],
        ]
        labels = [f"{name.replace('distrain_', 'distrain ')}\n×{n}" for name, n in groups]
        colors = ["tab:blue" if name.startswith("distrain") else "tab:gray" for name, _ in groups]
        ax.bar(range(len(groups)), medians, yerr=errors, capsize=3, color=colors)
        ax.set_xticks(range(len(groups)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(workload)
        ax.set_ylabel("steady-state samples/s (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path, runs: list[dict], compression: list[dict], info: dict[str, Any], *, workers: int
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.jsonl", "w") as f:
        for row in [*runs, *({"compression_run": c} for c in compression), {"machine": info}]:
            f.write(json.dumps(row) + "\n")
    _chart(runs, Path(f"{out}.png"))
    load = ", ".join(
        f"{key.split('_')[-1]} {' / '.join(f'{x:.1f}' for x in info[key])}"
        for key in ("load_average_at_start", "load_average_at_end")
    )
    steps = ", ".join(f"{k} {v}" for k, v in info["measure_steps"].items())
    lines = [
        "# Benchmark: distrain and its peers",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"torch {info['torch']}, Ray {info['ray']}; git {info['git']}. Load average (1/5/15 min) "
        f"at {load}: the machine is shared, so compare rows of one run only. {info['repeats']} "
        "rounds; in each, the two sides of every target pair ran alternately (the parameter-server "
        f"pair in the first {info.get('ps_repeats', info['repeats'])}; rows of one run, once, "
        f"in the first). Total {info['total_s'] / 60:.1f} min. "
        "Written by `benchmarks/run.py`.",
        "",
        "Every row runs in a fresh process on the same data and initial weights, at the "
        "workload's batch per worker (global batch = per worker × workers). samples/s is the "
        f"steady state after {info['warmup_steps']} warm-up steps ({steps} steps measured); "
        "first step is from the launch command to the end of the first optimizer step "
        "(interpreter, imports and Ray start-up included). A target's ratio is of the medians; "
        "its spread is the range of the per-round ratios, and a target inside it is undecided.",
        "",
        *_targets(runs, workers),
        *_compression(compression),
        "## Throughput",
        "",
        f"![samples/s]({Path(f'{out}.png').name})",
        "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in runs):
        lines += _table(runs, workload, workers)
    Path(f"{out}.md").write_text("\n".join(lines))
