"""Registrations from outside the core, found by name through package entry points.

A data source (`data.source: NAME`) or an evaluation task (`eval --task NAME`) that the
library does not define registers itself when its module is imported. So that the core never
imports such a module itself (the demo's synthetic set and its tasks are one), a package
names it in its entry points, group `sqllava_jax.sources` or `sqllava_jax.tasks`, and the
registry imports it the first time a config or a command asks for that name:

    [options.entry_points]
    sqllava_jax.sources =
        synthetic = sqllava_jax.demo.synthetic
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping, Optional, TypeVar

SOURCES = "sqllava_jax.sources"
TASKS = "sqllava_jax.tasks"

V = TypeVar("V")


def load(group: str, name: str) -> bool:
  """Imports every module that entry-point `group` lists under `name` (each registers what
  it defines on import); whether there was one."""
  found = False
  for entry in metadata.entry_points(group=group, name=name):
    entry.load()
    found = True
  return found


def lookup(registry: Mapping[str, V], group: str, name: str) -> Optional[V]:
  """`registry[name]`, first importing what entry-point `group` lists for `name` when it is
  not registered yet; None when nothing registers it."""
  if name not in registry:
    load(group, name)
  return registry.get(name)
