"""`aggregator=fsdp`: torch's FSDP2 (`fully_shard`), so a worker holds 1/W of the model.

Each block of the wrap policy (distrain/blocks.py: the model's repeated blocks, or the classes
named in `aggregator.wrap`) is one FSDP unit, then the root takes what is left. Parameters,
gradients and optimizer state are sharded (DTensors): a unit's parameters are all-gathered just
before its forward and backward and freed after (`reshard_after_forward`), gradients are
reduce-scattered to their shards, and the optimizer steps on the local shard only. Because
`fully_shard` works in place, the bare module the worker holds IS the sharded model: its forward
is a collective, so evaluation runs on every rank in lock-step (`eval_batches`).

Checkpoints are sharded: each rank writes its local shards (distrain/shards.py) and reads back
the rows of its new shards, through torch's `distributed.checkpoint.state_dict` helpers, so a
run resumes on any worker count and strategy (FSDP 2 -> DDP 1, DDP 2 -> FSDP 3) and no rank
ever holds the whole state. Only model.pt, at the end, is gathered in full.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from distrain.aggregators import process_group
from distrain.aggregators.base import GradientAggregator
from distrain.blocks import find_blocks
from distrain.config import Config, ConfigError
from distrain.device import dist_backend

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FSDP(GradientAggregator):
    collective_forward = True

    def __init__(
        self,
        wrap: list[str] | None = None,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
    ) -> None:
        self.wrap_classes = list(wrap or [])
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.module: nn.Module | None = None
        self.steps = 0

    @classmethod
    def check_job(cls, job: Config) -> None:
        trainer = job.trainer
        if trainer.shard_optimizer:
            raise ConfigError(
                "trainer.shard_optimizer=true is redundant with aggregator=fsdp, which already "
                "shards the optimizer state (with the parameters and gradients); set "
                "trainer.shard_optimizer=false."
            )
        if trainer.precision == "16":
            raise ConfigError(
                "trainer.precision=16 is not supported by aggregator=fsdp (its gradient scaler "
                "would need sharded gradients); use trainer.precision=bf16 (bf16 compute, fp32 "
                "gradient reduction) or 32."
            )

    @classmethod
    def rendezvous(cls, workers: list[Any], config: dict[str, Any]) -> dict[str, Any]:
        # Even one worker joins a group (of one): fully_shard needs a process group.
        return ray.get(workers[0].serve_rendezvous.remote())

    @classmethod
    def resume_key(cls, config: dict[str, Any]) -> Any:
        return "mean-gradient"  # the textbook step on the global batch, as allreduce's

    def connect(
        self,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        rendezvous: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.device, self.rank, self.world_size = device, rank, world_size
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        process_group.join(
            dist_backend(device.type),
            rendezvous,
            rank=rank,
            world_size=world_size,
            timeout_s=timeout_s,
        )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return find_blocks(model, self.wrap_classes)

    def compile_units(self, model: nn.Module) -> list[nn.Module]:
        # Per block, as torchtitan does: each unit's all-gather stays outside compiled code.
        return self.blocks(model) or [model]

    def wrap(self, model: nn.Module) -> nn.Module:
        mixed = MixedPrecisionPolicy()  # fp32 everywhere
        if self.precision == "bf16":  # bf16 parameters and compute, gradients reduced in fp32
            mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = OffloadPolicy()
        if self.cpu_offload:  # sharded parameters, gradients and optimizer state live on the CPU
            offload = CPUOffloadPolicy(pin_memory=self.device.type != "cpu")
        settings = {
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": mixed,
            "offload_policy": offload,
        }
        for block in self.blocks(model):
            fully_shard(block, **settings)
        fully_shard(model, **settings)
        self.module = model
        return model

    def sync_if(self, sync: bool) -> AbstractContextManager:
        # FSDP2 reads the flag in backward (which the loop runs after this context closes), so it
        # is set here and left set: every micro-batch sets it again. Non-last micro-batches keep
        # unsharded gradients and reduce-scatter nothing.
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(sync)
        return nullcontext()

    def eval_batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Validation batches in lock-step: the sharded forward is a collective.

        Validation shards differ by up to one sample, so ranks may have one batch fewer. Before
        each batch the ranks agree (one all-reduce of a flag) whether any still has one; a rank
        that has run out forwards an empty batch (no samples, so nothing is added to the sums).
        Simpler than gathering full parameters for evaluation, and memory stays sharded.
        """
        empty = None
        source = iter(batches)
        while True:
            batch = next(source, None)
            more = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
            if batch is not None:
                empty = tuple(t[:0] for t in batch)
                yield batch
            elif empty is None:
                raise RuntimeError(
                    f"rank {self.rank} has no validation sample to shape an empty batch: "
                    "the validation set is smaller than trainer.workers"
                )
            else:
                yield empty

    # model.pt: the full (unsharded) model, gathered from the shards on every rank.

    def model_state_dict(self, model: nn.Module) -> dict[str, Any]:
        return get_model_state_dict(model, options=FULL)

    def load_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optimizer_state: dict[str, Any],
    ) -> None:
        """From this rank's shards (DTensors of the sharded parameters' layout)."""
        set_model_state_dict(model, model_state)
        name_of = {param: name for name, param in model.named_parameters()}
        names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
        set_optimizer_state_dict(model, optimizer, _by_name(optimizer_state, names))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`Optimizer.state_dict()`'s format (keyed by the parameter's index in the groups) keyed by
    parameter name, as torch's state-dict helpers take it: `names` in the optimizer's order (its
    groups one after the other, as `build.param_groups` made them)."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
