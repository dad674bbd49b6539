"""The sink's agreement at checkpoint boundaries: one answer per step for every rank."""

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
