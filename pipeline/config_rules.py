"""The field-checking machinery behind :mod:`pipeline.config`: rule-carrying dataclass fields, strict
types of raw YAML / override values, and the per-field rules (``choices``, bounds, patterns, URL schemes,
partition specs) checked after interpolation. Every failure is a one-line :class:`ConfigError` naming the
dotted key. The schema itself (the section dataclasses and cross-field rules) lives in :mod:`pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from pipeline.flows.partitions import resolve_partitions

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
IDENT = r"[a-z][a-z0-9_]*"
_PATTERN_HELP = {
    NAME: "letters, digits, '.', '_' or '-'",
    IDENT: "lowercase letters, digits or '_', starting with a letter",
}


class ConfigError(ValueError):
    """A bad configuration; the message is one line and names the dotted key."""


def rule_field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with validation rules in its metadata (see :func:`_check_rules`)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_tree(tree: Any, cls: type, prefix: str, source: str) -> None:
    """Unknown keys and strict types of the raw (unmerged, unresolved) values of one layer."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys ({source}); got {show(tree)}")
    hints = _hints(cls)
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in hints:
            known = [f"{prefix}{k}" for k in hints]
            close = difflib.get_close_matches(full, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{full}' ({source}){hint}")
        _check_value(value, hints[key], full, source)


def _check_value(value: Any, hint: Any, key: str, source: str) -> None:
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: checked after resolution by check_resolved
    if dataclasses.is_dataclass(hint):
        check_tree(value, hint, f"{key}.", source)
        return
    ok, expected = _type_ok(value, hint)
    if not ok:
        raise ConfigError(f"{key}: expected {expected} ({source}); got {show(value)}")


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    """Whether ``value`` strictly has the annotated type, and the type's name for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        # YAML turns `name: 2024` into an int; a string field takes it as text, but not true/false/null
        return isinstance(value, (str, int, float)) and not isinstance(value, bool), "a string"
    if origin is list:
        ok = isinstance(value, (list, tuple)) and all(_type_ok(v, args[0])[0] for v in value)
        return ok, f"a list of {_PLURAL[args[0]]}"
    if origin is tuple:
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        ok = ok and all(_type_ok(v, a)[0] for v, a in zip(value, args))
        return ok, f"a list of {len(args)} {_PLURAL[args[0]]}"
    raise TypeError(f"config.py: unsupported field annotation {hint!r}")


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def check_resolved(obj: Any, cls: type, prefix: str) -> None:
    """Types after interpolation, then the per-field rules in ``metadata``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            check_resolved(value, hint, f"{key}.")
            continue
        ok, expected = _type_ok(value, hint)
        if not ok:
            raise ConfigError(f"{key}: expected {expected} after interpolation; got {show(value)}")
        _check_rules(key, value, f.metadata)


def _check_rules(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key} must be one of {list(rules['choices'])}; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be finite; got {value!r}")
    for item in value if isinstance(value, (list, tuple)) else [value]:
        _check_bounds(key, item, rules, "item_" if isinstance(value, (list, tuple)) else "")
    if rules.get("nonempty") and len(value) == 0:
        raise ConfigError(f"{key} must not be empty")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise ConfigError(f"{key} must consist of {_PATTERN_HELP[rules['pattern']]}; got {value!r}")
    if "item_pattern" in rules:
        for item in value:
            if not re.fullmatch(rules["item_pattern"], item):
                raise ConfigError(f"{key}: entry {item!r} must consist of {_PATTERN_HELP[rules['item_pattern']]}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key} has duplicate entries: {value}")
    if "url_schemes" in rules and value:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in rules["url_schemes"]:
            schemes = " or ".join(f"{s}://..." for s in rules["url_schemes"])
            raise ConfigError(f"{key} must be empty or {schemes}; got {value!r}")
    if rules.get("partitions"):
        try:
            resolve_partitions(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


def _check_bounds(key: str, value: Any, rules: Mapping[str, Any], pre: str) -> None:
    what = "every entry of " + key if pre else key
    for name, bad, word in (
        ("ge", lambda v, b: v < b, "≥"),
        ("gt", lambda v, b: v <= b, ">"),
        ("le", lambda v, b: v > b, "≤"),
        ("lt", lambda v, b: v >= b, "<"),
    ):
        bound = rules.get(pre + name)
        if bound is not None and bad(value, bound):
            raise ConfigError(f"{what} must be {word} {bound}; got {value!r}")


def show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
