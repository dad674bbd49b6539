"""The schema and validate(): every bad value is refused with a message that names it."""

import pytest

from distrain.config import ConfigError, validate
from tests.conftest import compose_job


def test_default_job_composes_and_is_valid() -> None:
    job = compose_job()
    validate(job)
    assert job["trainer"]["workers"] == 2
    assert job["data"]["_target_"] == "distrain.data.sklearn.digits"
    assert job["data"]["seed"] == job["trainer"]["seed"]  # interpolation resolved


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.workers=0"], "trainer.workers=0"),
        (["trainer.workers=-2"], "trainer.workers=-2"),
        (["trainer.spare_workers=-1"], "trainer.spare_workers=-1 must be >= 0"),
        (["optimizer.lr=-0.1"], "optimizer.lr=-0.1"),
        (["optimizer.lr=0"], "optimizer.lr=0"),
        (["trainer.precision=8"], "trainer.precision='8'"),
        (["trainer.epochs=0"], "trainer.epochs=0"),
        (["data.micro_batch_size=0"], "data.micro_batch_size=0"),
        (["data.micro_batch_size=abc"], "data.micro_batch_size=abc"),
    ],
)
def test_bad_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose_job(*overrides))


def test_wrong_types_and_unknown_keys_fail_at_composition() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_job("trainer.workers=two")
    with pytest.raises(ConfigCompositionException):
        compose_job("trainer.wrokers=2")
    with pytest.raises(ConfigCompositionException):
        compose_job("trainer.device=tpu")
    # Choices are enums: the bad value and the allowed ones are named.
    for override, allowed in [
        ("logger.progress=fancy", "auto, rich, plain, none"),
        ("trainer.nan_policy=ignore", "stop, skip_step"),
        ("trainer.activation_checkpointing=all", "none, blocks"),
    ]:
        with pytest.raises(ConfigCompositionException) as error:
            compose_job(override)
        value = override.split("=")[1]
        assert f"Invalid value '{value}', expected one of [{allowed}]" in str(error.value.__cause__)
