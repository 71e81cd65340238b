"""Typed config machinery: YAML / dict -> frozen dataclasses, with `key.sub=value` overrides.

Every config in the project is a tree of frozen dataclasses. This module turns plain data (a
YAML file, a dict, command-line overrides) into such a tree and back, checking every key and
every type on the way: an unknown key or a value of the wrong type is a `ValueError` naming
the full dotted key, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
  """A config value or key that the schema does not accept."""


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp`, converting only lossless cases."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
  if origin is typing.Literal:
    if value not in args:
      choices = ", ".join(repr(a) for a in args)
      raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    return value
  if isinstance(tp, type) and dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
    return from_dict(tp, value, prefix=key)
  if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple and args:
      if len(args) != len(value):
        raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
      return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    elem = args[0] if args else Any
    return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (dict, Mapping) or tp is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    vt = args[1] if len(args) == 2 else Any
    return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}: expected true/false, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value
  raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
  """Builds dataclass `cls` from `data`; unknown keys and wrong types raise `ConfigError`."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    where = f" in {prefix}" if prefix else ""
    known = ", ".join(sorted(fields))
    raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(_join(prefix, k) for k in unknown)}{where}; known keys: {known}")
  kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
  """The plain-data form of a config tree (tuples become lists), ready for YAML or JSON."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def _join(prefix: str, key: str) -> str:
  return f"{prefix}.{key}" if prefix else key


def parse_override(item: str) -> tuple[list[str], Any]:
  """`'train.lr=1e-4'` -> (['train', 'lr'], 1e-4); the value is parsed as YAML."""
  if "=" not in item:
    raise ConfigError(f"override {item!r} is not of the form key.sub=value")
  key, raw = item.split("=", 1)
  key = key.strip()
  if not key or any(not part for part in key.split(".")):
    raise ConfigError(f"override {item!r} has an empty key")
  value = yaml.safe_load(raw) if raw.strip() else ""
  if isinstance(value, str) and _looks_like_float(raw):
    value = float(raw)  # YAML 1.1 reads '1e-4' as a string.
  return key.split("."), value


def _looks_like_float(raw: str) -> bool:
  try:
    float(raw)
  except ValueError:
    return False
  return True


def apply_overrides(data: dict, overrides: Sequence[str], cls: type) -> dict:
  """Applies `key.sub=value` overrides to raw config data, checking keys against `cls`."""
  data = _deepcopy(data)
  for item in overrides:
    path, value = parse_override(item)
    node = data
    node_cls: type | None = cls  # None below a key that is not a dataclass
    for i, part in enumerate(path):
      dotted = ".".join(path[: i + 1])
      if node_cls is not None:
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in names:
          raise ConfigError(f"unknown key {dotted}; known keys: {', '.join(sorted(names))}")
        hint = typing.get_type_hints(node_cls)[part]
        node_cls = hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None
      if i == len(path) - 1:
        node[part] = value
      else:
        child = node.get(part)
        if child is None:
          child = node[part] = {}
        if not isinstance(child, dict):
          raise ConfigError(f"cannot set {'.'.join(path)}: {dotted} is not a mapping")
        node = child
  return data


def _deepcopy(data: Any) -> Any:
  if isinstance(data, dict):
    return {k: _deepcopy(v) for k, v in data.items()}
  if isinstance(data, list):
    return [_deepcopy(v) for v in data]
  return data


def load_yaml(path: str | os.PathLike) -> dict:
  """Reads a YAML config. `base: other.yaml` (or a list, later entries winning) names files,
  relative to this one, that are merged underneath it."""
  with open(path) as f:
    data = yaml.safe_load(f) or {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping")
  bases = data.pop("base", None)
  if bases is None:
    return data
  merged: dict = {}
  here = os.path.dirname(os.path.abspath(path))
  for base in [bases] if isinstance(bases, str) else bases:
    merged = deep_merge(merged, load_yaml(os.path.join(here, base)))
  return deep_merge(merged, data)


def deep_merge(base: dict, update: dict) -> dict:
  out = _deepcopy(base)
  for k, v in update.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = deep_merge(out[k], v)
    else:
      out[k] = _deepcopy(v)
  return out
