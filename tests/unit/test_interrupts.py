"""Ctrl-C and SIGTERM outside distrain's own code (while Hydra composes a sweep's next job) are
held until distrain's code runs again: real signals, sent to this process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from distrain.cli import _DeferredInterrupts


@pytest.fixture
def interrupts() -> Iterator[_DeferredInterrupts]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deferred = _DeferredInterrupts()
    deferred.install()
    yield deferred
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_outside_distrain_code_is_held_then_raised_on_entry(
    interrupts: _DeferredInterrupts, signum: int
) -> None:
    os.kill(os.getpid(), signum)  # as if inside OmegaConf: nothing is raised there
    assert interrupts.pending
    with pytest.raises(KeyboardInterrupt), interrupts.raised_here():
        pytest.fail("the job must not start once a stop is pending")


def test_a_signal_inside_distrain_code_is_raised_at_once(interrupts: _DeferredInterrupts) -> None:
    reached_after_signal = False
    with pytest.raises(KeyboardInterrupt), interrupts.raised_here():
        os.kill(os.getpid(), signal.SIGINT)
        reached_after_signal = True
    assert not reached_after_signal and not interrupts.pending
    # Outside again: held, not raised.
    os.kill(os.getpid(), signal.SIGINT)
    assert interrupts.pending
