"""Joining a cluster that asks for Ray's authentication token, decided in one call.

Ray 2.5x turns token authentication on for every `ray start --head`. A driver joins such a
cluster only with its token and `RAY_AUTH_MODE=token`; without them `ray.init` retries for 20 s
or more, printing a gRPC error line a second, and then says it could not connect, naming
neither the token nor what to set. Ray's own command line (`ray status`, ...) uses a token it
finds on this machine when RAY_AUTH_MODE is unset; `ray.init(address=...)` does not, so a
`distrain cluster.address=auto` next to a `ray start --head` failed that way.

Here one GCS call (answered only with the cluster's token, when it has one) asks the cluster
first. If it needs a token and the one this machine has (Ray's sources, in Ray's order) is
accepted, token authentication is turned on for this process, as Ray's command line does;
otherwise the error names what is missing and how to get it, in a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from distrain.config import ConfigError

# Any GCS method: with token authentication on, the GCS answers none without the token.
PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
# Ray's own notice when it turns token authentication on ("... Set RAY_AUTH_MODE=disabled to opt
# out"): the cluster made that choice, not this driver; the notice is dropped.
RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def local_token() -> tuple[str, str] | None:
    """The token Ray would send from this process, and where it is from: RAY_AUTH_TOKEN, else
    the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (Ray's order). None if none."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named) if named else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return (token, str(path)) if token else None


def accepted(target: str, token: str | None, timeout_s: float) -> bool:
    """Whether the GCS at `target` answers a call carrying `token` (None: no token). Any answer
    but "unauthenticated" counts: other failures are ray.init's to report."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(PROBE_METHOD)(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            return error.code() != grpc.StatusCode.UNAUTHENTICATED
    return True


def check_token(address: str, target: str, timeout_s: float) -> None:
    """Before joining the GCS at `target` (host:port; the user wrote `address`): if the cluster
    asks for a token, make sure this process sends the right one, or say what to do."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS channel needs Ray's certificates; ray.init reports what goes wrong
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if accepted(target, None, timeout_s):
        return  # the cluster asks for no token
    found = local_token()
    where = (
        f"cluster.address={address!r}: the Ray cluster at {target} requires its authentication "
        "token"
    )
    get_it = (
        "`ray get-auth-token` on the head prints it; set RAY_AUTH_TOKEN to it here (or put it "
        "in ~/.ray/auth_token). On a trusted network, start the cluster with "
        "RAY_AUTH_MODE=disabled instead."
    )
    if found is None:
        raise ConfigError(
            f"{where} (Ray turns it on for a `ray start --head` wherever a token exists, such as "
            "the ~/.ray/auth_token an embedded Ray makes), and "
            f"this process has none: RAY_AUTH_TOKEN is unset and there is no token file "
            f"({os.environ.get('RAY_AUTH_TOKEN_PATH') or '~/.ray/auth_token'}). {get_it}"
        )
    token, source = found
    if not accepted(target, token, timeout_s):
        raise ConfigError(f"{where}, and refused this process's token (from {source}). {get_it}")
    if mode == "disabled":
        raise ConfigError(
            f"{where}, and RAY_AUTH_MODE=disabled here keeps this process from sending the one "
            f"it has (from {source}, which the cluster accepts): unset RAY_AUTH_MODE or set it "
            "to token."
        )
    if mode != "token":
        _turn_on_token_auth()


def _turn_on_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process, as Ray's command line sets it when it finds a token
    (setting the variable alone is not enough: Ray caches its config)."""
    from ray._private.authentication import authentication_token_setup

    logging.getLogger(RAY_TOKEN_SETUP_LOGGER).addFilter(drop_token_auth_notice)
    authentication_token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
