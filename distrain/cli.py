"""`distrain`: the Hydra application. Composes conf/ + overrides, resolves, hands off to the driver.

User mistakes end as one paragraph on stderr and exit code 2, not a traceback; a failed training
run exits 1; Ctrl-C exits 130. In a --multirun sweep a failed job is recorded and the sweep goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from distrain import driver
from distrain.config import ConfigError, register_configs
from distrain.progress import print_summary
from distrain.rundir import RunDirectory, git_revision

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PATH_KEYS = ("root", "path", "val_root")  # data paths made absolute before workers see them
log = logging.getLogger("distrain")


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The job as plain values: interpolations resolved, enums as strings, paths absolute."""
    try:
        job = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} has no value: set it on the command line.") from None
    for key in PATH_KEYS:
        if isinstance(job["data"].get(key), str):
            job["data"][key] = str(Path(job["data"][key]).expanduser().resolve())
    return job


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    hydra_cfg = HydraConfig.get()
    run_dir = RunDirectory(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        job = resolve(cfg)
        metrics = driver.train(job, run_dir, overrides=list(hydra_cfg.overrides.task))
    except (ConfigError, driver.TrainingFailed) as error:
        kind = "configuration error" if isinstance(error, ConfigError) else "training failed"
        print(f"distrain: {kind}: {error}", file=sys.stderr)
        if sweeping:  # one bad job must not end the sweep; its run dir says what happened
            run_dir.write_json(run_dir.path / "failed.json", {"error": f"{kind}: {error}"})
            return None
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except KeyboardInterrupt:
        print("distrain: interrupted", file=sys.stderr)
        sys.exit(130)
    metrics["overrides"] = list(hydra_cfg.overrides.task)
    metrics["git_revision"] = git_revision(CONF_DIR.parent)
    run_dir.write_metrics(metrics)
    print_summary(metrics, cfg.logger.progress)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = _run(cfg)
    # Returned to Hydra so sweepers that optimise (e.g. Optuna) can read the objective.
    return None if metrics is None else metrics.get("val_loss")


def main() -> None:
    register_configs()
    _hydra_main()
