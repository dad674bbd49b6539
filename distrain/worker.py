"""The worker actor: owns one device, builds its parts from the plain config, runs the loop."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray
import torch
from hydra.utils import instantiate

from distrain import build
from distrain import device as devices
from distrain.aggregators.base import GradientAggregator
from distrain.data.batches import ShardBatches
from distrain.loop import Parts, fit

log = logging.getLogger("distrain.worker")


class Worker:
    """One rank. Receives the resolved job as plain values; never a live module or Hydra."""

    def __init__(
        self, rank: int, world_size: int, job: dict[str, Any], device_type: str, sink: Any
    ):
        self.rank, self.world_size, self.job, self.sink = rank, world_size, job, sink
        trainer = job["trainer"]
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s", force=True)
        # One intra-op thread per reserved CPU, so N workers on N cores do not oversubscribe.
        torch.set_num_threads(max(1, int(trainer["cpus_per_worker"])))
        ifname = job["cluster"]["socket_ifname"]
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = ifname
        self.device = devices.worker_device(device_type)
        self.precision = trainer["precision"]

    def free_address(self) -> tuple[str, int]:
        """This node's IP as Ray sees it, and a port free on it now (rank 0's rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "rank": self.rank,
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    def setup(self, rendezvous: dict[str, Any]) -> None:
        """Join the aggregator's group and build model, data, optimizer on this device."""
        job, trainer, data = self.job, self.job["trainer"], self.job["data"]
        aggregator: GradientAggregator = instantiate(self.job["aggregator"], _convert_="all")
        aggregator.connect(
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            rendezvous=rendezvous,
            timeout_s=trainer["step_timeout_s"],
        )
        splits = build.build_splits(data)
        batches = ShardBatches(
            splits,
            global_batch=data["batch_size"],
            rank=self.rank,
            world_size=self.world_size,
            seed=trainer["seed"],
            device=self.device,
            loader=data.get("loader", "auto"),
            num_workers=data.get("num_workers", 0),
        )
        torch.manual_seed(trainer["seed"])  # the same initial parameters on every rank
        model = build.build_model(job["model"], splits).to(self.device)
        torch.manual_seed(trainer["seed"] + 1 + self.rank)  # distinct dropout/augmentation streams
        # The aggregator builds it: ZeRO sharding, or a server-side step, are its business.
        optimizer = aggregator.build_optimizer(
            instantiate(job["optimizer"], _convert_="all"),  # `_partial_: true`: a factory
            model.parameters(),
            shard=trainer.get("shard_optimizer", False),
        )
        epochs, max_steps = trainer["epochs"], trainer["max_steps"]
        total_steps = epochs * batches.steps_per_epoch
        scheduler = build.build_scheduler(
            job["scheduler"],
            optimizer,
            steps_per_epoch=batches.steps_per_epoch,
            total_steps=min(total_steps, max_steps or total_steps),
        )
        self.parts = Parts(
            model=model,
            train_model=aggregator.wrap(model),
            loss_fn=build.build_loss(job["loss"]).to(self.device),
            optimizer=optimizer,
            scheduler=scheduler,
            aggregator=aggregator,
            batches=batches,
            autocast=devices.autocast_factory(self.device.type, self.precision),
            scaler=devices.grad_scaler(self.device.type, self.precision),
            micro_batch_size=data.get("micro_batch_size") or batches.local_batch,
            task=splits.task,
        )

    def fit(self) -> dict[str, Any]:
        trainer = self.job["trainer"]
        steps = fit(
            self.parts,
            epochs=trainer["epochs"],
            max_steps=trainer["max_steps"],
            log_every_n_steps=self.job["logger"]["log_every_n_steps"],
            report=self._report,
        )
        result: dict[str, Any] = {"rank": self.rank, "steps": steps}
        if self.rank == 0:
            result["state_dict"] = {k: v.cpu() for k, v in self.parts.model.state_dict().items()}
        self.parts.aggregator.close()
        result["aggregator"] = self.parts.aggregator.stats()
        return result

    def _report(self, record: dict[str, Any]) -> None:
        self.sink.push.remote({**record, "rank": self.rank})
