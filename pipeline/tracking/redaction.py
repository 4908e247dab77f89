"""Which params must never reach MLflow (credentials), and the redaction applied before logging."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value, in characters

# words that only ever name credentials
_SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "credential",
        "credentials",
        "apikey",
        "auth",
        "authorization",
        "cookie",
        "private",
        "signature",
        "sas",
        "bearer",
    }
)
# words that are ordinary ML vocabulary (attention keys, sequence tokens) as well as credential names
_AMBIGUOUS_WORDS = frozenset({"key", "keys", "token", "tokens"})
# ... and that are credentials whenever one of these comes right before them (access_key, api_token, …)
_CREDENTIAL_QUALIFIERS = frozenset(
    {
        "access",
        "api",
        "secret",
        "private",
        "auth",
        "session",
        "refresh",
        "bearer",
        "client",
        "signing",
        "encryption",
        "ssh",
        "account",
        "master",
        "personal",
        "id",
    }
)
# sections of the typed config whose fields are numeric/architectural hyperparameters: there, key/token
# mean attention keys or sequence tokens (model.tokens, model.key_dim) — the typed config cannot carry a
# credential there, because unknown keys are refused
_HYPERPARAMETER_SECTIONS = frozenset({"model", "optim", "train", "eval", "deepspeed"})
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def _words(component: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", component)  # camelCase → camel Case
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) param name looks like it holds a credential. The rule, per dot-component:

    1. a component starting with ``aws`` (``AWS_SECRET_ACCESS_KEY``, ``aws.region``): secret — every AWS_*;
    2. a word (split on ``_ - .`` and camelCase) in {secret, password, passwd, pwd, passphrase, credential(s),
       apikey, auth, authorization, cookie, private, signature, sas, bearer}: secret;
    3. ``key``/``token`` (or plurals) right after a qualifier such as access, api, secret, private, auth,
       session, refresh, client, ssh, account, personal, id (``access_key``, ``api_token``): secret;
    4. a bare ``key``/``token`` word anywhere else: secret, *except* under the typed config's hyperparameter
       sections (model, optim, train, eval, deepspeed), where they mean attention keys and sequence tokens
       (``model.tokens``, ``model.key_dim``) and no credential can appear.
    When in doubt the param is dropped: a missing param costs a look at the run's config artifact; a leaked
    secret costs a rotation.
    """
    components = key.split(".")
    hyper = len(components) > 1 and components[0] in _HYPERPARAMETER_SECTIONS
    for comp in components:
        if comp.lower().startswith("aws"):
            return True
        words = _words(comp)
        for i, word in enumerate(words):
            if word in _SECRET_WORDS:
                return True
            if word in _AMBIGUOUS_WORDS:
                if i > 0 and words[i - 1] in _CREDENTIAL_QUALIFIERS:
                    return True
                if not hyper:
                    return True
    return False


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """``params`` as MLflow param strings, with secrets removed.

    Drops keys for which :func:`is_secret_key` holds and values that contain an AWS access key id; replaces
    ``user:password@`` in URLs with ``***@``; truncates values to MLflow's 6000 characters.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        key = str(key)
        text = str(value)
        if is_secret_key(key) or _AWS_KEY_ID.search(text):
            continue
        text = _URL_USERINFO.sub("***@", text)
        out[key] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out
