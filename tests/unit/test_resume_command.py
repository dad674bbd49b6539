"""`resume=RUN`: which overrides the resumed run composes with (distrain/resume_command.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distrain.resume_command import resume_argv


def _record(run_dir: Path, subdir: str, overrides: list[str], at_s: float) -> None:
    """A Hydra record (`.hydra/overrides.yaml`) as an invocation at time `at_s` leaves it."""
    path = run_dir / subdir / "overrides.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(overrides), path)
    os.utime(path, (at_s, at_s))


def _checkpoint(run_dir: Path, step: int, at_s: float) -> None:
    """A checkpoint directory written at `at_s`, and the `latest` pointer to it."""
    name = f"step-{step:09d}"
    meta = run_dir / "checkpoints" / name / "meta.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text("{}")
    os.utime(meta, (at_s, at_s))
    (run_dir / "checkpoints" / "latest").write_text(name)


def _composed(argv: list[str]) -> list[str]:
    """The overrides the resume composes with (Hydra's run-dir settings left out)."""
    return [a for a in resume_argv(argv) if not a.startswith("hydra.")]


def test_a_second_resume_keeps_what_the_first_resume_changed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _record(run, ".hydra", ["trainer.epochs=10", "optimizer.lr=0.1"], at_s=1000)
    _checkpoint(run, 50, at_s=1100)  # the original run, stopped at step 50
    # `resume=RUN trainer.epochs=30` trained on and checkpointed (step 120), then stopped.
    _record(
        run, ".hydra/resume-a", ["optimizer.lr=0.1", f"resume={run}", "trainer.epochs=30"], 1200
    )
    _checkpoint(run, 120, at_s=1300)
    # A later resume with a mistake ended before any checkpoint: it is passed over.
    _record(run, ".hydra/resume-b", ["optimizer.lr=0.1", "trainer.epochs=30", "x=bad"], at_s=1400)
    assert _composed([f"resume={run}"]) == [
        "optimizer.lr=0.1",
        "trainer.epochs=30",
        f"resume={run}",
    ]
    # New overrides still win over the inherited ones.
    assert _composed([f"resume={run}", "trainer.epochs=40"]) == [
        "optimizer.lr=0.1",
        f"resume={run}",
        "trainer.epochs=40",
    ]


def test_a_checkpoint_from_before_a_resume_resumes_with_the_runs_own_overrides(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    _record(run, ".hydra", ["trainer.epochs=10"], at_s=1000)
    _checkpoint(run, 50, at_s=1100)
    _record(run, ".hydra/resume-a", [f"resume={run}", "trainer.epochs=30"], at_s=1200)
    _checkpoint(run, 120, at_s=1300)
    # Naming the older checkpoint: the configuration that wrote it.
    older = run / "checkpoints" / "step-000000050"
    assert _composed([f"resume={older}"]) == ["trainer.epochs=10", f"resume={older}"]
    # And `resume=RUN` right after the original run (no resume record yet): its own.
    fresh = tmp_path / "fresh"
    _record(fresh, ".hydra", ["trainer.epochs=10"], at_s=1000)
    _checkpoint(fresh, 50, at_s=1100)
    assert _composed([f"resume={fresh}"]) == ["trainer.epochs=10", f"resume={fresh}"]
    # A run directory copied without its times (every record newer): still the run's own.
    _record(fresh, ".hydra", ["trainer.epochs=10"], at_s=2000)
    _record(fresh, ".hydra/resume-a", ["trainer.epochs=30"], at_s=2000)
    assert _composed([f"resume={fresh}"]) == ["trainer.epochs=10", f"resume={fresh}"]


@pytest.mark.parametrize(
    "named", ["", "checkpoints", "checkpoints/latest", "checkpoints/step-000000050"]
)
def test_the_resume_writes_into_the_run_and_a_record_of_its_own(tmp_path: Path, named: str) -> None:
    """Whichever way the checkpoint is named (a checkpoint directory used to become the run
    directory: the resumed run wrote into it, with none of the run's overrides)."""
    run = tmp_path / "run"
    _record(run, ".hydra", ["trainer.epochs=10"], at_s=1000)
    _checkpoint(run, 50, at_s=1100)
    argv = resume_argv([f"resume={run / named}"])
    hydra = [a for a in argv if a.startswith("hydra.")]
    assert hydra[0] == f"hydra.run.dir={run}"
    assert hydra[1].startswith("hydra.output_subdir=.hydra/resume-")
    assert argv[0] == "trainer.epochs=10"
