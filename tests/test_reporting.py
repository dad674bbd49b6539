"""The sink's agreement at checkpoint boundaries (and, growing back in place, after any step):
one answer per step for every rank."""

import ray

from distrain.reporting import MetricsSink


def test_boundaries_agree_and_checkpoints_are_throttled(ray_address: str) -> None:
    sink = MetricsSink.remote(checkpoint_min_interval_s=3600)
    decide = lambda step, final=False: tuple(ray.get(sink.decide.remote(step, final)))  # noqa: E731
    assert decide(10) == (False, True)  # the first scheduled checkpoint is taken
    assert decide(20) == (False, False)  # the next within the interval is skipped...
    assert decide(20) == (False, False)  # ...for every rank that asks
    assert decide(30, final=True) == (False, True)  # the run's last one always
    sink.request_stop.remote()
    assert decide(40) == (True, True)  # and a stop's
    assert decide(10) == (False, True)  # a rank late to step 10 gets the answer given there
    ray.kill(sink)


def test_no_interval_checkpoints_every_boundary(ray_address: str) -> None:
    sink = MetricsSink.remote()
    assert [tuple(ray.get(sink.decide.remote(s, False))) for s in (1, 2, 3)] == [(False, True)] * 3
    ray.kill(sink)


def test_a_pause_stops_every_rank_after_the_same_step(ray_address: str) -> None:
    """Growing back in place: the ranks ask about each step (ahead of it); the first to ask
    fixes the answer, so a pause asked between two ranks' questions stops both at one step."""
    sink = MetricsSink.remote(checkpoint_min_interval_s=3600)
    pause_at = lambda step: ray.get(sink.pause_at.remote(step))  # noqa: E731
    assert pause_at(7) is False  # rank 0 asks about step 7
    sink.request_pause.remote()
    assert pause_at(7) is False  # rank 1 asks about step 7: the answer rank 0 got
    assert pause_at(8) is True and pause_at(8) is True  # both stop after step 8
    assert pause_at(107) is True and pause_at(7) is True  # step 7's answer forgotten, asked anew
    # At a checkpoint boundary a pause stops too, and asks for no checkpoint of its own.
    assert tuple(ray.get(sink.decide.remote(10, False))) == (True, True)  # the first: due
    assert tuple(ray.get(sink.decide.remote(20, False))) == (True, False)
    ray.kill(sink)
