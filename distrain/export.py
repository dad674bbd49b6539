"""`distrain export RUN [--best] [--out model.safetensors]`: a run's weights for use outside
distrain, the final ones or (`--best`) those of its best checkpoint (lowest validation loss).

The run's `model.pt` is already the consolidated (full, unsharded) state dict, whatever the
strategy, FSDP included; a checkpoint's model rows are gathered from its shards, whatever
worker count wrote them. Export writes the weights as safetensors (plain tensors, no pickle:
safe to load from anywhere) and the model's config beside it as JSON (`<out>.json`: the `model`
group of the run's `.hydra/config.yaml`, `_target_` included), so the same class can be built
and loaded:

    config = json.load(open("model.json"))
    model = hydra.utils.instantiate(config["model"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

The sizes the model took from the data (`input_shape`, `num_outputs`, a language model's
`vocab_size`) were recorded in metrics.json; export adds those its class takes to the config.
`model_state` and `model_config` are also how `distrain sample` loads a run's model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file

from distrain import checkpoint
from distrain.build import model_sizes
from distrain.checkpoint import CheckpointStore
from distrain.config import ConfigError
from distrain.shards import ShardReader


class ExportError(ValueError):
    """A run directory that cannot be exported: printed as one line, exit code 2."""


def export(run_dir: Path, out: Path | None = None, *, best: bool = False) -> Path:
    """Write RUN's model (final, or its best checkpoint's) as safetensors (+ JSON config);
    returns the safetensors path."""
    run_dir = run_dir.expanduser().resolve()
    state, config = model_state(run_dir, best=best), model_config(run_dir)
    # safetensors refuses tensors that share memory and wants them contiguous.
    tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
    # The best checkpoint's weights get a name of their own: exporting both keeps both.
    default = run_dir / ("model-best.safetensors" if best else "model.safetensors")
    out = (out or default).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
    out.with_suffix(".json").write_text(json.dumps({"model": config}, indent=2, default=str) + "\n")
    return out


def model_state(run_dir: Path, *, best: bool = False) -> dict[str, torch.Tensor]:
    """The run's final model (model.pt) or, with `best`, its best checkpoint's, as full tensors."""
    if best:
        return _best_model_state(run_dir)
    require(run_dir / "model.pt", run_dir, "final model")
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def model_config(run_dir: Path) -> dict[str, Any]:
    """The run's model group plus the sizes it took from the data, where its class takes them,
    so `hydra.utils.instantiate(config)` builds the same model."""
    config_path = run_dir / ".hydra" / "config.yaml"
    require(config_path, run_dir, "Hydra config record")
    job = OmegaConf.load(config_path)
    try:  # `${...}` between model keys (or to other groups) as the run resolved them
        model = OmegaConf.to_container(job.model, resolve=True)
    except OmegaConfBaseException:  # a resolver only Hydra's run had: as written
        model = OmegaConf.to_container(job.model, resolve=False)
    recorded = data_facts(run_dir)
    if "input_shape" not in recorded:  # a run that ended before recording them
        return model
    try:
        sizes = model_sizes(
            model, recorded["task"], recorded["input_shape"], recorded["num_outputs"]
        )
    except Exception:  # the class is not importable here: record the sizes, the user passes them
        sizes = {k: recorded[k] for k in ("input_shape", "num_outputs")}
    return {**model, **sizes}


def data_facts(run_dir: Path) -> dict[str, Any]:
    """What metrics.json says about the data the model was built for: `task`, `input_shape`,
    `num_outputs`, `byte_level` (empty for a run without metrics.json)."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return {}
    metrics = json.loads(metrics_path.read_text())
    facts = {k: metrics[k] for k in ("input_shape", "num_outputs") if k in metrics}
    # Runs recorded before `task` and `byte_level` were: a language model reported perplexity,
    # and byte-level text bits per byte over 256 ids.
    language_model = "val_perplexity" in metrics
    facts["task"] = metrics.get("task", "language_model" if language_model else "classification")
    facts["byte_level"] = metrics.get(
        "byte_level", "val_bits_per_byte" in metrics and metrics.get("num_outputs") == 256
    )
    return facts


def require(path: Path, run_dir: Path, what: str) -> None:
    if not path.is_file():
        raise ExportError(
            f"{run_dir} has no {path.relative_to(run_dir)} (the {what} of a finished "
            "distrain run); name the directory of a run that completed."
        )


def _best_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from the run's best checkpoint (`checkpoints/best`)."""
    path = CheckpointStore(run_dir / "checkpoints", keep=0).best()
    if path is None:
        raise ExportError(
            f"{run_dir} has no best checkpoint (checkpoints/best, written once an evaluated step "
            "is checkpointed; off under trainer.keep_best_checkpoint=false); use its final "
            "model, without --best."
        )
    try:
        saved = checkpoint.load(path)
    except ConfigError as error:  # damaged: it says how, and which others there are
        raise ExportError(str(error)) from None
    reader = ShardReader(saved.meta["tensors"], lambda shard: saved.shards[shard]())
    return {key.removeprefix("model/"): reader.full(key) for key in reader.keys("model/")}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="distrain export", description="Write a run's model as safetensors."
    )
    parser.add_argument("run", type=Path, help="the run directory (holds model.pt)")
    parser.add_argument(
        "--best", action="store_true", help="the best checkpoint's weights (lowest val loss)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output file (default: RUN/model.safetensors, with --best RUN/model-best.safetensors)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.out, best=args.best)
    except ExportError as error:
        print(f"distrain export: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} and {out.with_suffix('.json')}")
