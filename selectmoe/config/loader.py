"""The config engine: YAML + dotted ``key=value`` overrides -> a typed dataclass.

Generic over any dataclass schema: unknown keys fail naming the nearest valid key, values are
checked against the field types and the field's allowed values (``ranged`` / ``one_of`` metadata),
renamed keys are moved with a deprecation line.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


# ---------------------------------------------------------------------------- allowed values


@dataclass(frozen=True)
class Between:
    """A number in a range (``None`` = unbounded; ``*_open`` excludes the bound); ``also`` lists
    values allowed outside it (``-1`` = off)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()

    def check(self, value, key: str) -> None:
        if value in self.also:
            return
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ConfigError(f"{key}={value!r} is out of range: expected {self.describe()}")

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        return text + "".join(f" or {v!r}" for v in self.also)


@dataclass(frozen=True)
class OneOf:
    choices: tuple
    hint: str = ""

    def check(self, value, key: str) -> None:
        if value not in self.choices:
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(f"{key}={value!r}: expected one of {list(self.choices)}{hint}")


def ranged(default, **bounds):
    """A dataclass field whose value must lie in ``Between(**bounds)``, checked at parse time."""
    return dataclasses.field(default=default, metadata={"allowed": Between(**bounds)})


def one_of(default, choices: tuple, hint: str = ""):
    """A dataclass field whose value must be one of ``choices``, checked at parse time."""
    return dataclasses.field(default=default, metadata={"allowed": OneOf(tuple(choices), hint)})


# ---------------------------------------------------------------------------- parsing


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict. Values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        _set_dotted(nested, key.split("."), value)
    return nested


def _set_dotted(target: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        existing = target.get(part)
        if not isinstance(existing, dict):
            existing = {}
            target[part] = existing
        target = existing
    target[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (sections expanded)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def build(cls: type, data: dict[str, Any], prefix: str = ""):
    """Construct ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, prefix, key))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            # merge onto the field's default instance so section defaults (e.g. LoRA targets) survive
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            kwargs[f.name] = build(tp, deep_merge(to_dict(default), value or {}), f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
            allowed = f.metadata.get("allowed")
            if allowed is not None and kwargs[f.name] is not None:
                allowed.check(kwargs[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


def _unknown_key_message(cls: type, prefix: str, key: str) -> str:
    full = f"{prefix}{key}"
    here = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]  # sections and keys at this level
    candidates = all_keys(cls, prefix)
    nearest = difflib.get_close_matches(full, here, n=1, cutoff=0.6) or difflib.get_close_matches(
        full, candidates, n=1, cutoff=0.5
    )
    if not nearest:  # a misspelt section: compare the last part only
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.5)
        nearest = [by_leaf[leaf[0]]] if leaf else []
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return f"unknown config key '{full}'{hint}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def rename_keys(data: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """Move each old dotted key found in ``data`` to its new name, saying so on stderr."""
    for old, new in renamed.items():
        *parents, leaf = old.split(".")
        holder = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or leaf not in holder:
            continue
        value = holder.pop(leaf)
        if parents and not holder:  # drop the emptied section
            parent = data
            for part in parents[:-1]:
                parent = parent[part]
            parent.pop(parents[-1])
        print(f"selectmoe: config key '{old}' is deprecated; use '{new}'", file=sys.stderr)
        _set_dotted(data, new.split("."), value)
    return data
