"""The benchmark workloads: every process starts from the same weights, and a distrain worker
builds only the model (its driver ships the data), so the bench does not charge it a data load
that its design avoids."""

import pytest
import torch

from benchmarks import distrain_workloads, workloads


@pytest.mark.parametrize("name", ["digits_mlp", "mlp6m", "cnn"])
def test_the_model_alone_has_the_workloads_initial_weights(name: str) -> None:
    whole = workloads.make_workload(name, seed=5).model_fn()
    alone = distrain_workloads.model(name, seed=5)
    pairs = list(zip(whole.state_dict().items(), alone.state_dict().items(), strict=True))
    assert all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in pairs)


def test_a_distrain_workers_model_loads_no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*_: object) -> None:
        raise AssertionError("the model was built with the workload's data")

    monkeypatch.setattr(workloads, "_data", no_data)
    assert isinstance(distrain_workloads.model("digits_mlp"), torch.nn.Module)
    with pytest.raises(AssertionError, match="with the workload's data"):
        distrain_workloads.splits("digits_mlp")  # the driver's side does load it
