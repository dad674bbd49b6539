"""A decoder-only transformer (GPT-2 shape) in plain torch: (B, T) token ids -> (B, T, V) logits.

Pre-LayerNorm blocks, causal self-attention through `F.scaled_dot_product_attention` (flash or
memory-efficient kernels where the device has them), a GELU MLP 4x wide, learned positions, input
and output embeddings tied. Initialisation as GPT-2's: N(0, 0.02) for every weight, zero biases,
and the projections that write into the residual stream scaled by 1/sqrt(2 * n_layer), since
each of the 2 * n_layer residual additions adds its variance (Radford et al. 2019, section 2.3;
karpathy/nanoGPT model.py does the same).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from distrain.models.sizes import check_count, check_dropout


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)  # writes into the residual stream
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        # (B, T, 3C) -> three (B, heads, T, C / heads)
        q, k, v = (
            t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, width)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # writes into the residual stream
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): the residual stream itself is never normalised."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """`vocab_size` comes from the data; `block_size` is the longest window it reads (the data
    pipeline reads the same value, `model.block_size`)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value, meaning in (
            ("vocab_size", vocab_size, "token ids are 0 .. vocab_size - 1"),
            ("block_size", block_size, "tokens per window"),
            ("n_head", n_head, "attention heads per layer"),
            ("n_embd", n_embd, "the width of every layer"),
        ):
            check_count(f"model.{name}", value, meaning)
        if n_layer < 0:
            raise ValueError(f"model.n_layer must be >= 0 (transformer blocks), got {n_layer}")
        check_dropout(dropout)
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        self.block_size, self.n_layer, self.n_embd = block_size, n_layer, n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Tied: one matrix reads tokens in and scores them out (Press & Wolf 2017); it saves
        # vocab x width parameters (38 M of GPT-2 small's 124 M).
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(
                f"a window of {time} tokens is longer than block_size={self.block_size}"
            )
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (the tied matrix once); without the position table, which
        does no multiply-adds, when `non_embedding` (as nanoGPT and PaLM count N)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.wpe.weight.numel() if non_embedding else total

    def flops_per_token(self, time: int) -> float:
        """Training FLOPs per token at window `time`: 6N (forward 2N + backward 4N of the
        matmuls) + 12·L·d·T (attention scores and weighted sums), PaLM appendix B."""
        return 6 * self.num_params() + 12 * self.n_layer * self.n_embd * time
