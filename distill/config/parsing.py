"""One YAML recipe plus ``key=value`` overrides, coerced to the typed settings and validated before anything loads."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distill.config.settings import DataConfig, RunConfig
from distill.errors import DistillError, collect_errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", str(tp))


RECIPES = Path(__file__).parents[2] / "recipes"  # a name given for a path is pointed there
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest subnormal: anything smaller rounds to 0


class _NotFinite(DistillError):
    """nan or inf for a float setting: reported as such, even where null is also allowed."""


def _as_float(value: Any) -> Optional[float]:
    """A number, or a string that reads as one (YAML 1.1 reads "1e-4" as a string); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond the float range
        return math.inf
    except ValueError:
        return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; the error names the dotted ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _coerce(value, arg, key)  # its own errors name the nested key
            try:
                return _coerce(value, arg, key)
            except _NotFinite:
                raise
            except DistillError:
                continue
        raise DistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise DistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("["):  # command line: [a, b]
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise DistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}") from None
        if isinstance(value, str):  # command line: a,b,c
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):  # a single item
            value = [value]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DistillError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            # nan passes every range check (all comparisons are false): loss.w_kd=nan silently disabled KD
            if not math.isfinite(number):
                raise _NotFinite(f"config key '{key}' must be a finite number, got {value!r}")
            # every float setting ends up in a float32 tensor (the optimizer's lr, the loss's weights):
            # 1e39 there is inf, 1e-50 is 0
            if abs(number) > FLOAT32_MAX or 0 < abs(number) < FLOAT32_TINY:
                raise _NotFinite(f"config key '{key}' must fit a 32-bit float (a magnitude of {FLOAT32_TINY:.3g} to "
                                 f"{FLOAT32_MAX:.3g}, or 0), got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise DistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    """Each key a section takes -> its type (``LossConfig``'s weight keys come from the loss terms)."""
    return cls.setting_hints() if hasattr(cls, "setting_hints") else typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = list(hints)
    kwargs = {}

    def take(key: str, value: Any) -> None:
        if key not in names:
            if hasattr(cls, "unknown_key") and (line := cls.unknown_key(str(key), prefix)):
                raise DistillError(line)
            close = difflib.get_close_matches(str(key), names, n=1)
            elsewhere = [k for k in _dotted_keys(RunConfig) if k.rsplit(".", 1)[-1] == key and k != prefix + key]
            hint = (f" (did you mean '{prefix}{close[0]}'?)" if close else
                    f" (did you mean '{elsewhere[0]}'?)" if elsewhere else "")
            raise DistillError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)

    collect_errors(functools.partial(take, key, value) for key, value in data.items())
    return cls(**kwargs)


@functools.cache
def _dotted_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every setting's dotted name, for pointing a key given in the wrong section to its own."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        nested = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        keys += _dotted_keys(nested[0], f"{prefix}{name}.") if nested else [prefix + name]
    return tuple(keys)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise DistillError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise DistillError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):  # no setting takes a collection: "summarize: " is a string
        value = raw
    return key.split("."), value


def merge_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise DistillError(f"override '{text}': '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply ``key=value`` overrides, and return a validated RunConfig."""
    return _build(RunConfig, merge_overrides(_read_tree(path), list(overrides))).validate()


def load_typed(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """A YAML recipe with ``key=value`` overrides as the dataclass ``cls`` (type-checked; its own
    validation is the caller's): the settings of the steps other than training (``distill finetune``)."""
    return _build(cls, merge_overrides(_read_tree(path), list(overrides)))


def load_data_config(path: str | Path | None, overrides: list[str], data_path: str) -> DataConfig:
    """The ``data`` section of a recipe (or the defaults) with ``data.*=value`` overrides, at ``data_path``:
    what the steps around training that tokenize as training does take (``distill cache-teacher``)."""
    given = merge_overrides({}, list(overrides))
    if set(given) - {"data"}:
        raise DistillError(f"only data.* settings apply here, got '{next(k for k in given if k != 'data')}'")
    tree = merge_overrides(_read_tree(path), list(overrides)).get("data") or {}
    data = _coerce({**tree, "path": data_path}, DataConfig, "data")
    data.validate("data")
    return data


def _read_tree(path: str | Path | None) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise DistillError(f"config file {p} is a directory: give a YAML file")
        if not p.is_file():
            name = p if p.suffix == ".yaml" else Path(f"{p}.yaml")
            hint = (f" (did you mean recipes/{name}?)" if not p.is_absolute() and (RECIPES / name).is_file()
                    else "")
            raise DistillError(f"config file not found: {p}{hint}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise DistillError(f"config file {p} is not a text file (a YAML recipe is UTF-8 text)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise DistillError(f"config file {p} is not valid YAML{where}: {what}") from None
        if not isinstance(tree, dict):
            raise DistillError(f"config file {p} must hold a mapping at the top level")
    return tree
