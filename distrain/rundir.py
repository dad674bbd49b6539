"""The run directory (Hydra's output dir): config, event files, checkpoints, metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Atomic: readers (a sweep summary, a script) never see half a file."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_json(self.metrics_path, metrics)


def git_revision(directory: Path) -> str | None:
    """The code's git revision (with a -dirty suffix), kept with the results as their evidence."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None
