"""Typed dataclass trees from YAML: recipe files, ``dotted.key=value`` overrides, and the
type checks of every value (``kdrl.config`` declares the dataclasses and their defaults).

Every fault is a ``ConfigError`` naming the file and line or the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from kdrl.paths import path_problem


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; the message names the key."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(sorted(options))})"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; parse strings from the command line."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}"
                              + (_closest(str(value), [str(a) for a in args]) if isinstance(value, str) else ""))
        return value
    if origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf/nan pass every range check written as a comparison
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}")
        return build(hint, value, key + ".")
    return value


def build(cls: type, values: dict, prefix: str = "", base: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from a (possibly partial) mapping over ``base``."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"unknown key '{prefix}{name}'{_closest(name, names)}")
        hint = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            setattr(obj, name, build(hint, value, f"{prefix}{name}.", base=current))
        else:
            setattr(obj, name, _coerce(value, hint, f"{prefix}{name}"))
    return obj


def apply_override(config: Any, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value (e.g. train.steps=10)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    obj, cls, prefix = config, type(config), ""
    for part in parts[:-1]:
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"unknown key '{prefix}{part}'{_closest(part, names)}")
        obj, cls, prefix = getattr(obj, part), _hints(cls)[part], prefix + part + "."
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"'{prefix.rstrip('.')}' is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({reason}); quote it to pass "
                          f"text, e.g. {key.strip()}='\"{raw}\"'") from None
    if value is None and raw.strip().lower() not in ("null", "none", "~"):
        value = raw
    if isinstance(value, (dict, list)) and _hints(cls).get(parts[-1]) in (str, typing.Optional[str]):
        raise ConfigError(f"{key.strip()}: expected text, but YAML reads {raw!r} as a "
                          f"{'mapping' if isinstance(value, dict) else 'list'}; quote it to pass text, e.g. "
                          f"{key.strip()}='\"{raw}\"'")
    build(cls, {parts[-1]: value}, prefix, base=obj)




class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"line {line}: duplicate key '{key}' (first given on line {seen[key]}); keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_recipe(recipe: str | Path) -> dict:
    """The mapping of a recipe file; ConfigError naming the file (and line) for anything that is
    not a readable UTF-8 YAML mapping with unique keys."""
    path = Path(recipe)
    problem = path_problem(path)
    if problem:
        raise ConfigError(f"recipe '{recipe}': {problem}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{recipe} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the "
                          "recipe as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as error:
        raise ConfigError(f"{recipe} {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{recipe}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{recipe}: a recipe must be a mapping of sections")
    return values
