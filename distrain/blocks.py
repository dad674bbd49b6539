"""A model's repeated blocks, and what is applied to them from outside the model.

One definition of "block" serves three features: the FSDP wrap policy (`aggregator=fsdp` shards
each block as one unit), activation checkpointing (`trainer.activation_checkpointing=blocks`
recomputes each block's activations in backward) and per-block compilation under FSDP
(`trainer.compile=true`). Models stay plain torch: nothing here needs their cooperation.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distrain.config import ConfigError, TrainerConfig


def find_blocks(model: nn.Module, class_names: Sequence[str] | None = None) -> list[nn.Module]:
    """The model's blocks: modules of the named classes, or by default its repeated blocks.

    Named: every module (not the root) whose class name is in `class_names`, outermost only
    (a named module inside another named one belongs to its parent's unit).
    Default: among all modules, the parent with the most children of one class that has
    parameters; those children are the blocks (the MLP's Linear layers, ResNet's four stages,
    the ModuleList of a GPT's transformer blocks). Ties go to the group holding more parameters,
    so a GPT's blocks beat its pair of embeddings. A model without two such children has no
    blocks (FSDP then shards it as one unit).
    """
    if class_names:
        names = set(class_names)
        found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
        if not found:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(
                f"aggregator.wrap={list(class_names)} names no module of this model; its module "
                f"classes are {', '.join(present)}. Name some of them, or leave aggregator.wrap "
                "empty for the model's repeated blocks."
            )
        inside = {id(sub) for m in found for sub in m.modules() if sub is not m}
        return [m for m in found if id(m) not in inside]
    best: tuple[int, int] = (1, 0)  # (children of one class, their parameters)
    blocks: list[nn.Module] = []
    for parent in model.modules():
        children = [c for c in parent.children() if any(True for _ in c.parameters())]
        for cls, count in Counter(type(c) for c in children).items():
            group = [c for c in children if type(c) is cls]
            key = (count, sum(p.numel() for c in group for p in c.parameters()))
            if key > best:
                best, blocks = key, group
    return blocks


def checkpoint_activations(blocks: Sequence[nn.Module]) -> None:
    """`trainer.activation_checkpointing=blocks`: each block keeps only its inputs for backward
    and recomputes its activations there (less memory, one more forward per block).

    The block's `forward` is replaced on the instance, not the module by a wrapper: parameter
    names (state dicts, checkpoints, export) stay the same, and FSDP's hooks, which run around
    `__call__`, still see the block as one unit. Non-reentrant checkpointing, as torch advises.
    """
    for block in blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def compile_modules(modules: Sequence[nn.Module]) -> None:
    """`trainer.compile=true`: `torch.compile` each module in place, as `nn.Module.compile` does
    (the compiled `_call_impl` replaces the module's call), so module objects, parameter names
    and every reference stay the same. Compilation happens on the first forward (and backward);
    its time is reported as `compile_s` (the first step's extra time). A failure while
    compiling a forward names the module and the way out.
    """
    # Modules share their call's code object, and dynamo counts recompilations per code object
    # (train/eval, grad mode, shapes of each block): allow a few per compiled module.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 8 * len(modules))
    for module in modules:
        module._compiled_call_impl = _naming_failures(
            torch.compile(module._call_impl), type(module).__name__
        )


def _naming_failures(compiled: Callable[..., Any], name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RuntimeError(
                f"torch.compile failed on module {name} ({type(error).__name__}: {first}); "
                "set trainer.compile=false to train without compiling."
            ) from error

    return call


def prepare(model: nn.Module, aggregator: Any, trainer: TrainerConfig) -> bool:
    """Activation checkpointing and compilation, applied before the aggregator wraps the model
    (FSDP then shards blocks that are already checkpointed and compiled, as torchtitan does).
    Returns whether anything was compiled."""
    if trainer.activation_checkpointing == "blocks":
        found = aggregator.blocks(model)
        if not found:
            raise ConfigError(
                f"trainer.activation_checkpointing=blocks: {type(model).__name__} has no "
                "repeated blocks to checkpoint; set trainer.activation_checkpointing=none."
            )
        checkpoint_activations(found)
    if trainer.compile:
        compile_modules(aggregator.compile_units(model))
        return True
    return False
