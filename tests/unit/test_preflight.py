"""The driver's checks cost it no torch._dynamo import (~1.5 s of CPU on every run's start)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: this test's own process has imported torch._dynamo long ago.
CHECK = """
import sys
from distrain import config, preflight
from distrain.cli import compose_job
import torch

preflight.check(config.typed(compose_job(*sys.argv[1:])))
original = torch.optim.Optimizer.add_param_group.__wrapped__
print("dynamo imported:", "torch._dynamo" in sys.modules)
print("cache left behind:", hasattr(original, "__dynamo_disable"))
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
print("dynamo imported by a later optimizer:", "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the default job: SGD, no schedule
        ["optimizer=adamw", "optimizer.decay_norms_and_biases=false", "scheduler=cosine"],
    ],
    ids=["sgd", "adamw-two-groups-cosine"],
)
def test_the_dry_build_does_not_import_dynamo_and_leaves_torch_as_it_was(
    overrides: list[str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, *overrides], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dynamo imported: False" in done.stdout
    assert "cache left behind: False" in done.stdout
    # After the checks, an optimizer's methods are exempted from tracing as torch intends.
    assert "dynamo imported by a later optimizer: True" in done.stdout
