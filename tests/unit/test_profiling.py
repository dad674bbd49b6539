"""The step profiler: torch.profiler over a window of training steps, its trace sent as a record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from torch import nn

from distrain.profiling import profiled_steps
from distrain.records import ProfileRecord


def _train(steps: int, window: int, after: int) -> list[ProfileRecord]:
    """`steps` SGD steps of a small model, profiling `window` of them after `after`."""
    sent: list[ProfileRecord] = []
    model = nn.Linear(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with profiled_steps(window, after, torch.device("cpu"), sent.append) as profiler:
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
            profiler.step(step)
    return sent


def _step_events(record: ProfileRecord) -> list[str]:
    events = json.loads(gzip.decompress(record.trace_gz))["traceEvents"]
    return sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_the_window_after_the_warm_up_steps_is_sent_once() -> None:
    [record] = _train(steps=10, window=3, after=4)
    assert (record.first_step, record.last_step) == (5, 7)
    assert _step_events(record) == ["ProfilerStep#4", "ProfilerStep#5", "ProfilerStep#6"]
    events = json.loads(gzip.decompress(record.trace_gz))["traceEvents"]
    assert sum(e.get("name") == "Optimizer.step#SGD.step" for e in events) == 3


def test_a_run_that_ends_inside_the_window_sends_what_it_recorded() -> None:
    [record] = _train(steps=6, window=5, after=3)
    assert (record.first_step, record.last_step) == (4, 6)


def test_nothing_is_sent_when_off_or_when_the_run_ends_before_the_window() -> None:
    assert _train(steps=5, window=0, after=0) == []
    assert _train(steps=4, window=3, after=6) == []


def test_past_the_window_the_profiler_is_stopped() -> None:
    sent: list[ProfileRecord] = []
    with profiled_steps(2, 1, torch.device("cpu"), sent.append) as profiler:
        for step in range(1, 6):
            profiler.step(step)
        assert len(sent) == 1 and not profiler.open and profiler.recorded == [2, 3]
    assert len(sent) == 1  # closing again sends nothing


def test_a_replacement_worker_s_trace_lands_beside_the_first(tmp_path: Path) -> None:
    """A heal's replacement records its own window on the same rank: both traces are kept."""
    from distrain.recording import RunRecorder
    from distrain.rundir import RunDirectory

    recorder = RunRecorder(RunDirectory(tmp_path), "none")
    first, replacement = (gzip.compress(f'{{"n": {n}}}'.encode()) for n in (1, 2))
    recorder.write_profile(ProfileRecord(6, 8, first, rank=1))
    recorder.write_profile(ProfileRecord(306, 308, replacement, rank=1))
    written = {p.name: p.read_bytes() for p in (tmp_path / "profile").iterdir()}
    assert written == {
        "rank1-steps6-8.pt.trace.json.gz": first,
        "rank1-steps306-308.pt.trace.json.gz": replacement,
    }
