"""The GPT: output shape, causality, tied embeddings, GPT-2 initialisation, FLOPs, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from distrain.lm import PerTokenLoss, generate
from distrain.models.gpt import GPT

TINY = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def tiny(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=64, **{**TINY, **overrides})


def test_logits_for_every_position() -> None:
    model = tiny()
    assert model(torch.randint(0, 64, (3, 16))).shape == (3, 16, 64)
    assert model(torch.randint(0, 64, (3, 5))).shape == (3, 5, 64)  # shorter windows too


def test_a_position_never_sees_the_future() -> None:
    model = tiny().eval()
    x = torch.randint(0, 64, (1, 16))
    changed = x.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_embeddings_are_tied_and_counted_once() -> None:
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    width, vocab, layers = 32, 64, 2
    per_block = (3 * width * width + 3 * width) + (width * width + width)  # attention
    per_block += (4 * width * width + 4 * width) + (4 * width * width + width)  # MLP
    per_block += 2 * 2 * width  # two LayerNorms
    total = vocab * width + 16 * width + layers * per_block + 2 * width
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * width


def test_gpt2_initialisation() -> None:
    model = GPT(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)  # projections into the residual stream
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert GPT(vocab_size=8, bias=False, **TINY).blocks[0].ln_1.bias is None


def test_flops_per_token_is_6n_plus_attention() -> None:
    model = tiny()
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 32 * 16


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"n_embd=30 must be divisible by model\.n_head=4"):
        GPT(vocab_size=8, block_size=8, n_layer=1, n_head=4, n_embd=30)
    with pytest.raises(ValueError, match="longer than block_size=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_learns_a_repeating_sequence() -> None:
    model = tiny()
    loss_fn = PerTokenLoss(torch.nn.CrossEntropyLoss())
    seq = torch.arange(17) % 7
    x, y = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert first > 3.5 and loss.item() < 0.2  # from ~ln 64 to nearly certain
    out = generate(
        model,
        torch.tensor([0, 1, 2]),
        num_samples=2,
        max_new_tokens=5,
        block_size=16,
        temperature=0.5,
        top_k=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert out == [[3, 4, 5, 6, 0]] * 2


def test_generate_crops_the_context_and_samples_among_top_k() -> None:
    model = tiny()
    out = generate(
        model, torch.randint(0, 64, (40,)), num_samples=3, max_new_tokens=20, block_size=16, top_k=1
    )
    assert len(out) == 3 and all(len(o) == 20 for o in out)
    assert out[0] == out[1] == out[2]  # top-1 is greedy: every sample the same
