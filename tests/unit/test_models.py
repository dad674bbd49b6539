"""Every model builds from (input_shape, num_outputs), has the right output shape and can learn."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from distrain import preflight
from distrain.config import ConfigError, typed
from distrain.models.cnn import CNN
from distrain.models.gpt import GPT
from distrain.models.mlp import MLP
from distrain.models.resnet import resnet18
from distrain.models.rnn import RNNClassifier
from tests.conftest import compose_job

CASES = {
    "mlp": (MLP, (10,), {"hidden_sizes": (16,)}),
    "cnn-1ch": (CNN, (1, 28, 28), {"channels": (4, 8), "hidden": 16}),
    "cnn-3ch": (CNN, (3, 32, 32), {"channels": (4, 8), "hidden": 16, "dropout": 0.1}),
    "cnn-hw": (CNN, (9, 11), {"channels": (4,), "hidden": 8}),
    "resnet18-small": (resnet18, (3, 32, 32), {"small_input": True}),
    "resnet18-1ch": (resnet18, (1, 32, 32), {"small_input": False}),
    "rnn-lstm": (RNNClassifier, (6, 5), {"cell": "lstm", "hidden_size": 8}),
    "rnn-gru-bi": (
        RNNClassifier,
        (6, 5),
        {"cell": "gru", "hidden_size": 8, "num_layers": 2, "bidirectional": True},
    ),
    "rnn-image-rows": (RNNClassifier, (1, 8, 8), {"hidden_size": 8}),
}
# A deep net with BatchNorm on a batch of 4 overshoots at the small models' step size.
LEARNING_RATE = {"resnet18-small": 0.005, "resnet18-1ch": 0.005}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool) -> torch.Tensor:
    model.train(train_mode)
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", list(CASES))
def test_model_builds_and_one_step_reduces_loss(name):
    builder, input_shape, kwargs = CASES[name]
    torch.manual_seed(0)
    num_outputs, batch_size = 3, 4
    model = builder(input_shape=input_shape, num_outputs=num_outputs, **kwargs)
    assert isinstance(model, nn.Module)
    x = torch.randn(batch_size, *input_shape)
    y = torch.tensor([0, 1, 2, 1])
    # Compare losses in eval mode when dropout would make them random; otherwise in train mode,
    # because resnet's BatchNorm uses batch statistics there, which is what the step optimises.
    compare_in_train_mode = not kwargs.get("dropout")
    if not compare_in_train_mode:
        before = _loss(model, x, y, train_mode=False)
    params_before = [p.detach().clone() for p in model.parameters()]

    model.train()
    out = model(x)
    assert out.shape == (batch_size, num_outputs)
    loss = nn.functional.cross_entropy(out, y)
    assert torch.isfinite(loss)
    if compare_in_train_mode:
        before = loss.detach()  # the same forward _loss would do, without a second pass
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE.get(name, 0.05))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert any(
        not torch.equal(b, p) for b, p in zip(params_before, model.parameters(), strict=True)
    )
    after = _loss(model, x, y, compare_in_train_mode)
    assert torch.isfinite(after) and after < before, (before.item(), after.item())


def test_model_argument_errors():
    with pytest.raises(ValueError, match="at least 8x8"):
        CNN(input_shape=(1, 4, 4), num_outputs=2)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        CNN(input_shape=(10,), num_outputs=2)
    with pytest.raises(ValueError, match="halve"):
        CNN(input_shape=(1, 8, 8), num_outputs=2, channels=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="cell"):
        RNNClassifier(input_shape=(5, 3), num_outputs=2, cell="transformer")
    with pytest.raises(ValueError, match=r"\(T, F\)"):
        RNNClassifier(input_shape=(5,), num_outputs=2)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        resnet18(input_shape=(32, 32), num_outputs=2)


@pytest.mark.parametrize("hidden_sizes", [[0], [-3, 4], [1.5], "abc", [True]])
def test_mlp_hidden_sizes_must_be_widths(hidden_sizes):
    # A zero width used to train a constant model without a word; a string, one layer a letter.
    with pytest.raises(ValueError, match=r"model.hidden_sizes must be a list of whole numbers"):
        MLP(input_shape=(4,), num_outputs=2, hidden_sizes=hidden_sizes)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_mlp_dropout_must_be_a_probability_below_one(dropout):
    with pytest.raises(ValueError, match=r"model.dropout must be in \[0, 1\)"):
        MLP(input_shape=(4,), num_outputs=2, dropout=dropout)


def test_mlp_with_no_hidden_layer_is_one_linear_map():
    assert [type(m) for m in MLP(input_shape=(4,), num_outputs=2, hidden_sizes=[])] == [
        nn.Flatten,
        nn.Linear,
    ]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CNN(input_shape=(1, 28, 28), num_outputs=2, channels=(0, 8)), "model.channels"),
        (lambda: CNN(input_shape=(1, 28, 28), num_outputs=2, hidden=0), "model.hidden must"),
        (lambda: CNN(input_shape=(1, 28, 28), num_outputs=2, dropout=1.0), "model.dropout"),
        (lambda: GPT(vocab_size=10, block_size=0), "model.block_size must be"),
        (lambda: GPT(vocab_size=10, block_size=8, n_head=0, n_embd=8), "model.n_head must"),
        (lambda: GPT(vocab_size=0, block_size=8), "model.vocab_size must be"),
        (lambda: GPT(vocab_size=10, n_layer=-1), "model.n_layer must be >= 0"),
    ],
)
def test_sizes_that_build_a_broken_model_are_named(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden_sizes=[0]", "model.hidden_sizes must be a list of whole numbers >= 1"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
    ],
)
def test_the_driver_reports_a_size_mistake_as_the_sentence_naming_the_key(override, message):
    """Not as "model: ValueError: model.hidden_sizes ...": the sentence names the key already."""
    with pytest.raises(ConfigError) as error:
        preflight.dry_build(typed(compose_job(override)))
    assert str(error.value).startswith(message), str(error.value)


def test_numpy_integers_are_sizes_too():
    """A size computed with numpy (a vocabulary from a token file's maximum) is a whole number."""
    MLP(input_shape=(4,), num_outputs=2, hidden_sizes=[np.int64(3)])
    GPT(vocab_size=np.int64(10), block_size=np.int32(8), n_layer=1, n_head=2, n_embd=8)
