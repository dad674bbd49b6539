"""The LM benchmark workload: a byte-level GPT (4 layers, 128 wide, block 128) on one token file."""

from dataclasses import dataclass

from distrain.models.gpt import GPT


@dataclass(frozen=True)
class LMWorkload:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 256  # bytes
    batch_per_worker: int = 16  # windows: 2,048 tokens per worker and step
    lr: float = 1e-3


LM = LMWorkload()


def make_model() -> GPT:
    return GPT(
        vocab_size=LM.vocab_size,
        block_size=LM.block_size,
        n_layer=LM.n_layer,
        n_head=LM.n_head,
        n_embd=LM.n_embd,
    )
