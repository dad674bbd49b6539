"""--multirun: which jobs of a sweep still need running, and the sweep's summary table.

A job's run dir records how far it got: `metrics.json` (finished), `checkpoints/latest`
(interrupted after a checkpoint), `failed.json` (failed). Running the same sweep again into the
same sweep dir (`hydra.sweep.dir=...`) skips the finished jobs, resumes the checkpointed ones and
reruns the rest. Hydra numbers the jobs from the same overrides in the same order, so job N keeps
its number and its dir.

`SweepSummary` is a Hydra callback (`hydra.callbacks` in conf/config.yaml): at the end of a sweep
it reads every job's run dir and prints one row per job, and writes `summary.md` and
`summary.json` into the sweep dir.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distrain.config import ConfigError

SKIP, RESUME, RUN = "skip", "resume", "run"
# Overrides that do not change what a job computes: a sweep may be continued on another cluster
# or with another display without its finished jobs counting as different.
NEUTRAL_PREFIXES = ("cluster.", "logger.", "resume=", "hydra.")


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run that finished, or None. metrics.json is written atomically at the
    end of a run, so a readable one with the run's wall time is complete."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "wall_s" in metrics else None


def _significant(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.startswith(NEUTRAL_PREFIXES))


def plan(run_dir: Path, overrides: list[str]) -> tuple[str, dict[str, Any] | None]:
    """What a sweep job does with its run dir: (SKIP, its metrics), (RESUME, None) or (RUN, None).

    A finished run of other overrides in the same dir means the sweep changed under the same
    sweep dir; that is refused rather than reported as this job's result.
    """
    metrics = finished_metrics(run_dir)
    if metrics is not None:
        earlier = metrics.get("overrides")
        if earlier is not None and _significant(earlier) != _significant(overrides):
            raise ConfigError(
                f"{run_dir} holds a finished run of other overrides ({' '.join(earlier)}), not "
                f"this job's ({' '.join(overrides)}): the sweep changed. Give the changed sweep a "
                "new hydra.sweep.dir."
            )
        return SKIP, metrics
    if (run_dir / "checkpoints" / "latest").exists():
        return RESUME, None
    return RUN, None


def job_row(num: int, overrides: list[str], run_dir: Path, sweep_started: float) -> dict[str, Any]:
    """One line of the summary, from what the job left in its run dir."""
    row: dict[str, Any] = {
        "job": num,
        "overrides": overrides,
        "run_dir": str(run_dir),
        "val_accuracy": None,
        "samples_per_s": None,
        "wall_s": None,
    }
    metrics = finished_metrics(run_dir)
    failed = run_dir / "failed.json"
    if metrics is not None:
        earlier = (run_dir / "metrics.json").stat().st_mtime < sweep_started
        row["status"] = "skipped (finished before)" if earlier else "finished"
        for key in ("val_accuracy", "samples_per_s", "wall_s"):
            row[key] = metrics.get(key)
    elif failed.exists():
        row["status"] = "FAILED"
        try:
            row["error"] = json.loads(failed.read_text()).get("error", "")
        except (OSError, ValueError):
            row["error"] = "(failed.json unreadable)"
    else:
        row["status"] = "incomplete"
    return row


def _cells(row: dict[str, Any], common: set[str]) -> list[str]:
    def number(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    status = row["status"]
    if row.get("error"):
        status += ": " + row["error"].splitlines()[0][:80]  # the whole error: summary.json
    return [
        str(row["job"]),
        " ".join(o for o in row["overrides"] if o not in common),
        number(row["val_accuracy"], ".4f"),
        number(row["samples_per_s"], ",.0f"),
        number(row["wall_s"], ".1f"),
        status,
    ]


HEADER = ["job", "overrides", "val_accuracy", "samples/s", "wall_s", "status"]


def common_overrides(rows: list[dict[str, Any]]) -> set[str]:
    """The overrides every job has: the table shows what differs, the title what they share."""
    if len(rows) < 2:
        return set()
    return set.intersection(*(set(r["overrides"]) for r in rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """An aligned Markdown table: readable as plain text and rendered as a table on GitHub."""
    common = common_overrides(rows)
    lines = [HEADER, *(_cells(r, common) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(HEADER), rule, *(fmt(c) for c in lines[1:])]) + "\n"


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for name in HEADER:
            table.add_column(name, justify="right" if name in ("samples/s", "wall_s") else "left")
        common = common_overrides(rows)
        for row in rows:
            style = "red" if row["status"] == "FAILED" else None
            table.add_row(*_cells(row, common), style=style)
        Console().print(table)
    else:
        print(f"{title}\n{markdown_table(rows)}", end="", flush=True)


class SweepSummary(Callback):
    """Hydra callback: collects the jobs of a --multirun sweep and summarises them at its end."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, list[str], Path]] | None = None  # None: not in a sweep
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs, self.started = [], time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.jobs is not None:
            self.jobs.append(
                (
                    int(config.hydra.job.num),
                    list(job_return.overrides),
                    Path(config.hydra.runtime.output_dir),
                )
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Imported here: Hydra builds this callback for a single run too, which must not pay
        # for importing Ray before its job is checked.
        from distrain import cluster

        cluster.release()  # the Ray the jobs shared
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        rows = [job_row(n, o, d, self.started) for n, o, d in sorted(self.jobs or [])]
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        command = " ".join(OmegaConf.to_container(config.hydra.overrides.task))
        (sweep_dir / "summary.md").write_text(
            f"# Sweep {sweep_dir}\n\n`distrain --multirun {command}`\n\n{markdown_table(rows)}"
        )
        failed = sum(r["status"] == "FAILED" for r in rows)
        title = f"sweep {sweep_dir}: {len(rows)} jobs, {failed} failed"
        common = common_overrides(rows)
        if common:
            title += f"; every job: {' '.join(o for o in rows[0]['overrides'] if o in common)}"
        print_table(rows, title)
