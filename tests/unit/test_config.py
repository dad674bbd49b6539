"""The schema and validate(): every bad value is refused with a message that names it."""

import pytest

from distrain import config_errors
from distrain.config import (
    BATCHING_DEFAULTS,
    BATCHING_KEYS,
    BatchingConfig,
    ConfigError,
    Loader,
    plain,
    typed,
)
from distrain.validation import validate
from tests.conftest import CONF_DIR, compose_job


def test_default_job_composes_and_is_valid() -> None:
    job = compose_job()
    validate(job)
    assert job["trainer"]["workers"] == 2
    assert job["data"]["_target_"] == "distrain.data.sklearn.digits"
    assert job["data"]["seed"] == job["trainer"]["seed"]  # interpolation resolved


def test_the_data_group_types_its_batching_and_keeps_the_rest_for_the_builder() -> None:
    job = compose_job("data=iris", "data.loader=memory", "data.micro_batch_size=4")
    validate(job)
    data = typed(job).data
    assert data.batching == BatchingConfig(batch_size=16, micro_batch_size=4, loader=Loader.memory)
    assert data.source["_target_"] == "distrain.data.sklearn.iris"
    assert not set(BATCHING_KEYS) & set(data.source)  # the builder never sees them
    assert plain(typed(job))["data"] == job["data"]  # what the workers receive and type again


def test_batching_defaults_live_in_the_schema_and_still_take_overrides() -> None:
    """No data config repeats them; `data.num_workers=2` still works without a `+`."""
    for path in (CONF_DIR / "data").glob("*.yaml"):
        lines = path.read_text().splitlines()
        repeated = [
            line
            for line in lines
            for k, v in BATCHING_DEFAULTS.items()
            if line.split("#")[0].strip() == f"{k}: {'null' if v is None else v}"
        ]
        assert repeated == [], f"{path.name} repeats a schema default: {repeated}"
    job = compose_job("data=iris", "data.num_workers=2")
    assert typed(job).data.batching.num_workers == 2


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
        (["trainer.eval_every_n_steps=0"], "trainer.eval_every_n_steps=0 must be >= 1"),
        (["trainer.early_stopping_patience=0"], "trainer.early_stopping_patience=0 must be >= 1"),
        (["trainer.max_grad_norm=0"], "trainer.max_grad_norm=0.0 must be a finite number > 0"),
        (["trainer.max_grad_norm=inf"], "trainer.max_grad_norm=inf must be a finite number > 0"),
        (["logger.profile_steps=-3"], "logger.profile_steps=-3 must be >= 0"),
        (["data.micro_batch_size=0"], "data.micro_batch_size=0"),
        (["data.micro_batch_size=abc"], "data.micro_batch_size=abc"),
    ],
)
def test_bad_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose_job(*overrides))


def test_enum_choices_are_named_at_composition() -> None:
    """Choices are enums: the bad value and the allowed ones are named (a wrong type and an
    unknown key are in EXPLAINED below)."""
    for override, allowed in [
        ("trainer.device=tpu", "auto, cpu, cuda"),
        ("trainer.nan_policy=ignore", "stop, skip_step"),
        ("trainer.activation_checkpointing=all", "none, blocks"),
    ]:
        with pytest.raises(ConfigError) as error:
            compose_job(override)
        assert str(error.value) == f"{override} is not one of {allowed}."


# Each mistake Hydra or OmegaConf finds in the overrides, and the paragraph the CLI shows for it.
EXPLAINED = {
    "trainer.wrokers=2": "trainer.wrokers: the job has no such key (did you mean trainer.workers?)."
    " trainer has: workers, epochs, max_steps,",
    "nonsense=1": "nonsense: the job has no such key. At the top level it has: model, data,",
    "model=mpl": "model=mpl: there is no model config named 'mpl' (did you mean model=mlp?). "
    "The choices: cnn, gpt, mlp, resnet18, rnn.",
    "trainer.workers=two": "trainer.workers=two: 'two' is not a whole number.",
    "trainer.compile=maybe": "trainer.compile=maybe: 'maybe' is not true or false.",
    "logger.progress=fancy": "logger.progress=fancy is not one of auto, rich, plain, none.",
    "trainer.workers=[1,": "the command line could not be read (no viable alternative at input",
    # A sweeper or launcher comes from a plugin (hparams_search=optuna without its plugin fails
    # the same way, for hydra/sweeper=optuna).
    "hydra/launcher=joblib": "hydra/launcher=joblib: Hydra has no launcher named 'joblib' "
    "(the choices: basic). Launchers come from Hydra plugins: install the one that provides it, "
    "e.g. `pip install hydra-joblib-launcher`",
}


@pytest.mark.parametrize("override", sorted(EXPLAINED))
def test_a_composition_mistake_is_explained_in_one_paragraph(override: str) -> None:
    """Hydra's or OmegaConf's report, rewritten (compose_job raises what the CLI prints)."""
    with pytest.raises(ConfigError) as error:
        compose_job(override)
    assert str(error.value).startswith(EXPLAINED[override]), error.value
    assert "\n" not in str(error.value) and "HYDRA_FULL_ERROR" not in str(error.value)


def test_what_is_not_a_config_mistake_is_not_explained() -> None:
    assert config_errors.explain(RuntimeError("a bug in a model")) is None
    assert config_errors.explain(ValueError("Could not find 'model/x'")) is None


def test_a_key_the_schema_lacks_is_a_config_error_once_typed() -> None:
    """`+key=value` adds a key Hydra's composition allows; the typed schema has no room for it."""
    job = compose_job("+trainer.wrokers=2")
    with pytest.raises(ConfigError, match=r"^trainer\.wrokers: the job has no such key \(did you"):
        typed(job)
