"""The benchmark report's verdicts: ratios of medians, per-round spreads, undecided targets."""

from benchmarks.report import _targets, round_ratios, verdict, versus


def _run(name: str, workers: int, rate: float, round_: int, first_step_s: float = 10.0) -> dict:
    return {
        "workload": "w",
        "name": name,
        "workers": workers,
        "round": round_,
        "samples_per_s": rate,
        "time_to_first_step_s": first_step_s,
    }


def test_rounds_pair_with_the_same_round():
    a = [_run("a", 1, rate, i) for i, rate in enumerate((90.0, 110.0, 100.0))]
    b = [_run("b", 1, rate, i) for i, rate in enumerate((100.0, 100.0, 50.0))]
    assert round_ratios(a, b, "samples_per_s") == [0.9, 1.1, 2.0]


def test_a_system_run_once_is_compared_with_every_run():
    a = [_run("a", 2, rate, i) for i, rate in enumerate((100.0, 200.0))]
    b = [_run("b", 2, 100.0, 0)]  # ran in the first round only
    assert sorted(round_ratios(a, b, "samples_per_s")) == [1.0, 2.0]


def test_verdict_is_undecided_when_the_target_is_inside_the_spread():
    assert verdict([0.96, 1.02, 1.10], 0.95) == "met"
    assert verdict([0.80, 0.85, 0.90], 0.95) == "NOT met"
    assert verdict([0.90, 0.97, 1.00], 0.95) == "within the spread (undecided)"
    # Times: lower is better.
    assert verdict([0.40, 0.45], 0.5, lower_is_better=True) == "met"
    assert verdict([0.45, 0.55], 0.5, lower_is_better=True) == "within the spread (undecided)"
    assert verdict([0.55, 0.60], 0.5, lower_is_better=True) == "NOT met"


def test_target_line_gives_the_ratio_of_medians_and_the_per_round_range():
    runs = [_run("ours", 1, r, i) for i, r in enumerate((96.0, 100.0, 130.0))]
    runs += [_run("peer", 1, r, i) for i, r in enumerate((100.0, 100.0, 100.0))]
    runs.append({**_run("peer", 1, 0.0, 3), "error": "failed"})  # failed runs do not count
    line = versus(runs, "w", ("ours", 1), ("peer", 1), 0.95)
    assert "**1.00×**" in line
    assert "per round 0.96–1.30, 3 pairs" in line
    assert line.endswith("target ≥ 0.95×: met)")
    runs[0]["samples_per_s"] = 90.0  # one round below the target: no longer decided
    assert "within the spread (undecided)" in versus(runs, "w", ("ours", 1), ("peer", 1), 0.95)
    assert versus(runs, "w", ("ours", 1), ("missing", 1), 0.95) is None


def test_the_targets_include_the_time_to_first_step_against_torchrun():
    runs = [_run("distrain_allreduce", 2, 100.0, 0, first_step_s=6.0)]
    runs.append(_run("torchrun_ddp", 2, 50.0, 0, first_step_s=4.0))
    lines = _targets(runs, workers=2)
    assert "* w: samples/s of distrain_allreduce ×2 / torchrun_ddp ×2 = **2.00×**" in lines[2]
    first_step = "* w: time to first step of distrain_allreduce ×2 / torchrun_ddp ×2 = **1.50×**"
    assert lines[3].startswith(first_step) and lines[3].endswith("target ≤ 1×: NOT met)")
