"""Hydra's and OmegaConf's reports of a command-line mistake, as distrain's one paragraph.

Hydra prints its own report of a mistake it finds while composing the job: several lines, its
config search path, a hint to set HYDRA_FULL_ERROR and, for a misspelt key, the advice to add it
with `+key=value`, which distrain's typed schema then refuses with an OmegaConf report of its own
(exit 1, as if training had failed). Here each becomes one paragraph that names the bad value,
says what is allowed, and suggests the nearest valid name. Anything else is not explained
(None), so an unexpected error still shows its traceback.
"""

from __future__ import annotations

import difflib
import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
TYPE_NAMES = {"integer": "a whole number", "int": "a whole number", "float": "a number"}
TYPE_NAMES |= {"boolean": "true or false", "bool": "true or false"}


def explain(error: BaseException) -> str | None:
    """One paragraph for a mistake in the overrides or the config files, or None."""
    if isinstance(error, MissingConfigException) and error.options is not None:
        missing = error.missing_cfg_file or ""
        if "/" in missing:
            return _missing_option(missing, error.options)  # an option of a group: group/option
    if isinstance(error, OverrideParseException):
        reason = "; ".join(line for line in str(error).splitlines() if "hydra.cc" not in line)
        return (
            f"the command line could not be read ({reason}). Each override is key=value, a "
            "group choice group=option, or a list key=[1,2]; quote text with spaces or commas "
            f"(key='a b'). The grammar: {GRAMMAR}"
        )
    cause = error.__cause__ if isinstance(error, ConfigCompositionException) else error
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key(cause)
    if isinstance(cause, ValidationError):
        return _bad_value(cause)
    return None


def _nearest(name: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _missing_option(missing: str, options: list[str]) -> str:
    group, _, name = missing.rpartition("/")
    nearest = _nearest(name, options)
    guess = f" (did you mean {group}={nearest}?)" if nearest else ""
    if group.startswith("hydra/"):  # a sweeper or launcher: Hydra's plugins add the choices
        kind = group.rpartition("/")[2]
        return (
            f"{group}={name}: Hydra has no {kind} named {name!r}{guess} (the choices: "
            f"{', '.join(options)}). {kind.capitalize()}s come from Hydra plugins: install the "
            f"one that provides it, e.g. `pip install hydra-{name}-{kind}` (hparams_search=optuna "
            "needs hydra-optuna-sweeper)."
        )
    return (
        f"{group}={name}: there is no {group} config named {name!r}{guess}. The choices: "
        f"{', '.join(options)}. A config of your own goes in conf/{group}/{name}.yaml, or in a "
        "directory given with hydra.searchpath."
    )


def _shown(key: object) -> bool:
    """Whether a key is one a user sets: not Hydra's own node, not OmegaConf's `_partial_`."""
    name = str(key)
    return name != "hydra" and (name == "_target_" or not name.startswith("_"))


def _unknown_key(error: ConfigAttributeError | ConfigKeyError) -> str:
    full_key, key = str(error.full_key), str(error.key)
    parent = full_key.rpartition(".")[0]
    node = error.parent_node
    keys = [str(k) for k in node if _shown(k)] if isinstance(node, DictConfig) else []
    nearest = _nearest(key, keys)
    guess = f" (did you mean {f'{parent}.' if parent else ''}{nearest}?)" if nearest else ""
    where = f"{parent} has" if parent else "At the top level it has"
    listed = f" {where}: {', '.join(keys)}." if keys else ""
    return f"{full_key}: the job has no such key{guess}.{listed}"


def _bad_value(error: ValidationError) -> str:
    given = f"{error.full_key}={error.value}"
    reason = str(error.msg).splitlines()[0]
    if match := re.search(r"expected one of \[(.*)\]", reason):
        return f"{given} is not one of {match.group(1)}."
    if match := re.search(r"(?:could not be converted to|is not a valid) (\w+)", reason):
        kind = match.group(1)
        return f"{given}: {error.value!r} is not {TYPE_NAMES.get(kind.lower(), kind)}."
    return f"{given}: {reason}"
