"""The benchmark report: a markdown table per workload, the targets, the machine, and a chart."""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

REFERENCE = "torchrun_ddp"
PS_PEER = "ray_ps"
PS_OURS = "distrain_ps_sync"
PS_TARGET = 2.0  # parameter_server (sync, 2 workers, 2 servers) >= 2x Ray's docs PS
ACCURACY_MARGIN = 0.005  # fp16/bf16 within 0.5 points of no compression


def _find(rows: list[dict], workload: str, name: str, workers: int) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["workload"] == workload
            and r["name"] == name
            and r["workers"] == workers
            and "error" not in r
        ),
        None,
    )


def _table(rows: list[dict], workload: str, workers: int) -> list[str]:
    ref = _find(rows, workload, REFERENCE, workers)
    lines = [
        f"### {workload}",
        "",
        "| system | workers | samples/s | × torchrun DDP | first step (s) | peak RSS (MB) "
        "| final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["workload"] == workload):
        if "error" in r:
            lines.append(f"| {r['name']} | {r['workers']} | failed: see latest.jsonl | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}" if ref else "–"
        rate = f"{r['samples_per_s']:,.0f}"
        if "samples_per_s_runs" in r:  # best of several runs: show them all
            each = " / ".join(f"{x:,.0f}" for x in r["samples_per_s_runs"] if x is not None)
            rate += f" (best of {each})"
        lines.append(
            f"| {r['name']} | {r['workers']} | {rate} | {ratio} "
            f"| {r['time_to_first_step_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['final_loss']:.4f} |"
        )
    return [*lines, ""]


def _versus(
    rows: list[dict],
    workload: str,
    ours: tuple[str, int],
    theirs: tuple[str, int],
    target: float,
    key: str = "samples_per_s",
) -> str | None:
    """One target line: ours/theirs of `key`; for a time (`time_...`) lower is better."""
    a, b = _find(rows, workload, *ours), _find(rows, workload, *theirs)
    if not (a and b):
        return None
    ratio, is_time = a[key] / b[key], key.startswith("time_")
    met = ratio <= target if is_time else ratio >= target
    what = "time to first step" if is_time else "samples/s"
    sign = "≤" if is_time else "≥"
    return (
        f"* {workload}: {what} of {ours[0]} ×{ours[1]} / {theirs[0]} ×{theirs[1]} = "
        f"**{ratio:.2f}×** (target {sign} {target:g}×: {'met' if met else 'NOT met'})"
    )


def _targets(rows: list[dict], compression: list[dict], workers: int) -> list[str]:
    lines = ["## Targets", ""]
    ours_1, ours_w = ("distrain_allreduce", 1), ("distrain_allreduce", workers)
    for workload in dict.fromkeys(r["workload"] for r in rows):
        checks = [
            (ours_1, ("inmemory", 1), 0.9, "samples_per_s"),
            (ours_w, (REFERENCE, workers), 1.0, "samples_per_s"),
            (ours_w, ("ray_train", workers), 1.0, "samples_per_s"),
            (ours_w, ("ray_train", workers), 0.5, "time_to_first_step_s"),
        ]
        if workload == "digits_mlp":  # distributing a small job must not make it slower
            checks.append((ours_w, ("textbook", 1), 1.0, "samples_per_s"))
        for ours, theirs, target, key in checks:
            line = _versus(rows, workload, ours, theirs, target, key)
            if line:
                lines.append(line)
    for workload in dict.fromkeys(r["workload"] for r in rows):
        ours, peer = (
            _find(rows, workload, PS_OURS, workers),
            _find(rows, workload, PS_PEER, workers),
        )
        if ours and peer:
            ratio = ours["samples_per_s"] / peer["samples_per_s"]
            verdict = "met" if ratio >= PS_TARGET else "NOT met"
            lines.append(
                f"* {workload}: parameter_server sync ({workers} workers, 2 servers) / Ray docs "
                f"PS = **{ratio:.2f}×** (target ≥ {PS_TARGET:g}×: {verdict})"
            )
    if compression:
        base = next(c for c in compression if c["compression"] == "none")
        lines += [
            "",
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


def _chart(rows: list[dict], path: Path) -> None:
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        done = [r for r in rows if r["workload"] == workload and "error" not in r]
        labels = [f"{r['name'].replace('distrain_', 'distrain ')}\n×{r['workers']}" for r in done]
        colors = ["tab:blue" if r["name"].startswith("distrain") else "tab:gray" for r in done]
        ax.bar(range(len(done)), [r["samples_per_s"] for r in done], color=colors)
        ax.set_xticks(range(len(done)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(workload)
        ax.set_ylabel("steady-state samples/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path, rows: list[dict], compression: list[dict], info: dict[str, Any], *, workers: int
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.jsonl", "w") as f:
        for row in [*rows, *({"compression_run": c} for c in compression), {"machine": info}]:
            f.write(json.dumps(row) + "\n")
    _chart(rows, Path(f"{out}.png"))
    load = ", ".join(
        f"{key.split('_')[-1]} {' / '.join(f'{x:.1f}' for x in info[key])}"
        for key in ("load_average_at_start", "load_average_at_end")
    )
    lines = [
        "# Benchmark: distrain and its peers",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"torch {info['torch']}, Ray {info['ray']}; git {info['git']}. Load average (1/5/15 min) "
        f"at {load}: the machine is shared, so compare rows of one run only. One run per row, "
        f"except `ray_ps` and `distrain_ps_sync`: the best of {info['repeats']} alternating runs "
        f"(all shown). Total {info['total_s'] / 60:.1f} min. Written by `benchmarks/run.py`.",
        "",
        "Every row runs in a fresh process on the same data and initial weights, at the "
        "workload's batch per worker (global batch = per worker × workers). samples/s is the "
        "steady state after 20 warm-up steps; first step is from the launch command to the end "
        "of the first optimizer step (interpreter, imports and Ray start-up included).",
        "",
        *_targets(rows, compression, workers),
        "## Throughput",
        "",
        f"![samples/s]({Path(f'{out}.png').name})",
        "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        lines += _table(rows, workload, workers)
    Path(f"{out}.md").write_text("\n".join(lines))
