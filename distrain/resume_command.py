"""`distrain resume=RUN [overrides]`: the command line a resume runs, made before Hydra starts.

Hydra fixes the config and the run directory at startup, so the resumed run's overrides (its own,
then the new ones) and its run directory are put on the command line here. Nothing here imports
torch: a mistake is still named before torch and Ray are imported.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_argv(argv: list[str]) -> list[str]:
    """`distrain resume=RUN [overrides]` runs, into RUN, the overrides of the invocation that
    wrote the checkpoint it resumes (RUN's own, or a later resume's), then the new ones.

    The resumed run must compose exactly like the run it continues (same groups, same values)
    and keep writing into the original run dir, where its event files and checkpoints are. The
    original .hydra/ record is kept; each resume's goes to .hydra/resume-*.
    """
    resume = [a for a in argv if _key(a) == "resume"]
    if not resume or "--multirun" in argv or "-m" in argv:
        return argv
    target = Path(resume[-1].split("=", 1)[1]).expanduser().resolve()
    # One checkpoint (a directory with meta.json, a v1 file) or a pointer to one: RUN/checkpoints/X.
    is_checkpoint = target.is_file() or (target / "meta.json").is_file()
    run_dir = target.parent.parent if is_checkpoint else target
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    saved = _record_that_wrote(run_dir, _written_s(target))
    original = [str(o) for o in OmegaConf.load(saved)] if saved is not None else []
    given = {_key(a) for a in argv if not a.startswith("-")}
    kept = [o for o in original if _key(o) not in given and not _key(o).startswith("hydra.")]
    extra = []
    if "hydra.run.dir" not in given:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        extra = [f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    return [*kept, *argv, *extra]


def _record_that_wrote(run_dir: Path, written_s: float | None) -> Path | None:
    """The overrides.yaml of the invocation that wrote the checkpoint being resumed: the run's
    own, or a later resume's (`.hydra/resume-*/`) when one trained and checkpointed, so
    `resume=RUN` again keeps e.g. the `trainer.epochs=30` a first resume gave. A resume that
    ended before writing a checkpoint (a mistake on its command line, a kill at start-up) is
    newer than the checkpoint and passed over. The run's own record when no record is older
    (a run directory copied without its times); None: no record at all."""
    own = run_dir / ".hydra" / "overrides.yaml"
    if written_s is None:
        return own if own.is_file() else None
    records = [own, *(run_dir / ".hydra").glob("resume-*/overrides.yaml")]
    older = [r for r in records if r.is_file() and _mtime(r) <= written_s]
    return max(older, key=_mtime, default=own if own.is_file() else None)


def _written_s(target: Path) -> float | None:
    """When the checkpoint `resume=target` names was written (its meta.json's mtime), found as
    `checkpoint.resolve_resume` finds it but without importing torch; None if not found so (the
    driver then says what is wrong)."""
    for path in (target / "checkpoints" / "latest", target / "latest", target):
        if path.name in ("latest", "best") and path.is_file():
            path = path.parent / path.read_text().strip()
        for meta in (path / "meta.json", path):
            if meta.is_file() and (meta.name == "meta.json" or meta.suffix == ".pt"):
                return _mtime(meta)
    return None


def _mtime(path: Path) -> float:
    return path.stat().st_mtime
