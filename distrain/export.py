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

The model's `input_shape` and `num_outputs` came from the data; the run recorded them in
metrics.json and export adds them to the model config where its class takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from safetensors.torch import save_file

from distrain import checkpoint
from distrain.build import _accepts
from distrain.checkpoint import CheckpointStore
from distrain.config import ConfigError
from distrain.shards import ShardReader


class ExportError(ValueError):
    """A run directory that cannot be exported: printed as one line, exit code 2."""


def export(run_dir: Path, out: Path | None = None, *, best: bool = False) -> Path:
    """Write RUN's model (final, or its best checkpoint's) as safetensors (+ JSON config);
    returns the safetensors path."""
    run_dir = run_dir.expanduser().resolve()
    model_path, config_path = run_dir / "model.pt", run_dir / ".hydra" / "config.yaml"
    needed = [(config_path, "Hydra config record")]
    if not best:
        needed.insert(0, (model_path, "final model"))
    for path, what in needed:
        if not path.is_file():
            raise ExportError(
                f"{run_dir} has no {path.relative_to(run_dir)} (the {what} of a finished "
                "distrain run); name the directory of a run that completed."
            )
    if best:
        state = _best_model_state(run_dir)
    else:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    # safetensors refuses tensors that share memory and wants them contiguous.
    tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    out = (out or run_dir / "model.safetensors").expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
    record = {"model": _model_config(config["model"], _shape(run_dir))}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


def _best_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from the run's best checkpoint (`checkpoints/best`)."""
    path = CheckpointStore(run_dir / "checkpoints", keep=0).best()
    if path is None:
        raise ExportError(
            f"{run_dir} has no best checkpoint (checkpoints/best, written once an evaluated step "
            "is checkpointed; off under trainer.keep_best_checkpoint=false); export its final "
            "model without --best."
        )
    try:
        saved = checkpoint.load(path)
    except ConfigError as error:  # damaged: it says how, and which others there are
        raise ExportError(str(error)) from None
    reader = ShardReader(saved.meta["tensors"], lambda shard: saved.shards[shard]())
    return {key.removeprefix("model/"): reader.full(key) for key in reader.keys("model/")}


def _model_config(model: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any]:
    """The model group plus the sizes the run took from the data, where its class takes them,
    so `hydra.utils.instantiate(config["model"])` builds the same model."""
    try:
        target = get_object(model["_target_"])
    except Exception:  # not importable here: record the sizes, the user passes them
        return {**model, **shape}
    return {**model, **{k: v for k, v in shape.items() if _accepts(target, k) and k not in model}}


def _shape(run_dir: Path) -> dict[str, Any]:
    """input_shape / num_outputs as the run recorded them (metrics.json), when it did."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return {}
    metrics = json.loads(metrics_path.read_text())
    return {k: metrics[k] for k in ("input_shape", "num_outputs") if k in metrics}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="distrain export", description="Write a run's model as safetensors."
    )
    parser.add_argument("run", type=Path, help="the run directory (holds model.pt)")
    parser.add_argument(
        "--best", action="store_true", help="the best checkpoint's weights (lowest val loss)"
    )
    parser.add_argument("--out", type=Path, help="output file (default: RUN/model.safetensors)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.out, best=args.best)
    except ExportError as error:
        print(f"distrain export: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} and {out.with_suffix('.json')}")
