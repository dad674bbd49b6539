"""What the language-modelling task adds to the loop: a loss over every token, tokens/s and MFU
figures, and sampling.

The task flows from the data (`Splits.task == "language_model"`): the configured loss (by default
`loss=cross_entropy`) is applied to every position of the (B, T, V) logits against the (B, T)
targets, i.e. the mean cross-entropy over all B * T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from distrain import mfu
from distrain.config import LoggerConfig, TrainerConfig
from distrain.step import Parts


class PerTokenLoss(nn.Module):
    """A per-class loss (cross-entropy, NLL) over every token: (B, T, V) vs (B, T) -> mean."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits.flatten(0, -2), targets.flatten())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    num_samples: int,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue `prompt` (T0,) `num_samples` times, one token at a time; the new ids per sample.

    The context is cropped to the last `block_size` tokens. `top_k` keeps the k likeliest ids.
    """
    was_training = model.training
    model.eval()
    idx = prompt[None, -block_size:].repeat(num_samples, 1)
    start = idx.shape[1]
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :].float() / max(temperature, 1e-6)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx[:, start:].tolist()


def add_language_model_figures(
    parts: Parts,
    splits: Any,
    logger: LoggerConfig,
    trainer: TrainerConfig,
    *,
    device: torch.device,
    lead: bool,
) -> None:
    """Tokens/s and MFU figures for every rank; on the `lead` rank the sampler (logger.sample_*)."""
    block_size = splits.input_shape[0]
    parts.tokens_per_sample = block_size
    parts.flops_per_token = mfu.flops_per_token(parts.model, block_size)
    parts.peak_flops_per_s = mfu.peak_flops_per_s(device, trainer.precision, trainer.peak_tflops)
    parts.bytes_per_token = getattr(splits.val, "bytes_per_token", None)
    prompt = getattr(splits.val, "prompt", None)
    # Rank 0 samples; where the forward is a collective (FSDP) every rank runs it in step
    # (the same generator, the same tokens) and only rank 0's lines are sent.
    if not (lead or parts.aggregator.collective_forward):
        return
    if not logger.sample_tokens or prompt is None:
        return
    decode = getattr(splits.val, "decode", lambda ids: " ".join(map(str, ids)))
    context = prompt(logger.sample_prompt_tokens).to(device)
    generator = torch.Generator().manual_seed(trainer.seed)

    def sample() -> list[str] | None:
        with parts.autocast():
            lines = generate(
                parts.model,
                context,
                num_samples=logger.sample_count,
                max_new_tokens=logger.sample_tokens,
                block_size=block_size,
                temperature=logger.sample_temperature,
                top_k=logger.sample_top_k,
                generator=generator,
            )
        return [decode(context.tolist()) + " ⟶ " + decode(ids) for ids in lines] if lead else None

    parts.sample = sample
