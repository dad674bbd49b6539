"""Block detection (FSDP's units, activation checkpointing) and the options built on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain import preflight
from distrain.blocks import checkpoint_activations, compile_modules, find_blocks
from distrain.config import ConfigError, typed
from distrain.models.mlp import MLP
from distrain.models.resnet import resnet18
from distrain.validation import validate
from tests.conftest import compose_job


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class TinyGPT(nn.Module):
    """The shape of a GPT: two embeddings, a ModuleList of identical blocks, a head."""

    def __init__(self, layers: int = 2, width: int = 8) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(50, width), nn.Embedding(16, width)
        self.h = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.head(x)


def test_repeated_blocks_are_found_generically() -> None:
    mlp = MLP((8, 8), 10, hidden_sizes=[32, 32])
    assert find_blocks(mlp) == [mlp[1], mlp[3], mlp[5]]  # its Linear layers
    gpt = TinyGPT(layers=2)  # two blocks tie with two embeddings: the blocks hold more
    assert find_blocks(gpt) == list(gpt.h)
    assert find_blocks(nn.Linear(3, 3)) == []


@pytest.mark.slow  # torchvision's import
def test_resnet_blocks_are_its_stages() -> None:
    resnet = resnet18((3, 32, 32), 10)
    assert find_blocks(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]


def test_named_blocks_are_the_outermost_of_those_classes() -> None:
    gpt = TinyGPT(layers=3)
    assert find_blocks(gpt, ["Block", "Linear"]) == [*gpt.h, gpt.head]
    with pytest.raises(ConfigError, match=r"aggregator.wrap=\['Nope'\].*Block"):
        find_blocks(gpt, ["Nope"])


def test_checkpointed_blocks_keep_names_and_gradients() -> None:
    torch.manual_seed(0)
    plain = TinyGPT(layers=3)
    checkpointed = TinyGPT(layers=3)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_activations(find_blocks(checkpointed))
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, 50, (2, 16))
    plain(idx).square().mean().backward()
    checkpointed(idx).square().mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["aggregator=fsdp", "trainer.precision=16"], "trainer.precision=bf16"),
        (["aggregator=fsdp", "trainer.shard_optimizer=true"], "already shards"),
    ],
)
def test_bad_settings_are_named(overrides: list[str], message: str) -> None:
    job = compose_job(*overrides)
    validate(job)  # the values are fine; the FSDP aggregator's own check refuses them
    with pytest.raises(ConfigError, match=message):
        preflight.check_aggregator(typed(job))


def test_a_compile_failure_names_the_module_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_compile(fn: object) -> object:
        def fail(*args: object, **kwargs: object) -> None:
            raise torch._dynamo.exc.TorchDynamoException("cannot trace this")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = TinyGPT()
    compile_modules([model])
    with pytest.raises(RuntimeError, match=r"module TinyGPT .*trainer.compile=false"):
        model(torch.zeros(1, 4, dtype=torch.long))
