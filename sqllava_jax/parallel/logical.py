"""Logical axis names -> mesh axes.

Parameters and activations are annotated with logical names (`batch`, `length`, `embed`,
`mlp`, `heads`, `vocab`, ...). One ordered table of rules (config data, `mesh.rules`) maps
them to the mesh axes `data`, `fsdp`, `tensor`; changing the parallelism of a run changes
the table, never the model code. Activation constraints are no-ops unless a mesh and rules
are active (`with axis_rules(mesh, rules): ...`), so the same modules run unsharded in tests.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Sequence

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[Optional[str]]
Rules = Sequence[tuple[str, Sequence[str]]]

_state = threading.local()


def flax_rules(rules: Rules) -> tuple:
  """Config rules `(name, (mesh axes...))` -> flax's `(name, axes | None)` form."""
  out = []
  for name, axes in rules:
    axes = tuple(axes)
    out.append((name, None if not axes else (axes[0] if len(axes) == 1 else axes)))
  return tuple(out)


def logical_to_spec(names: LogicalAxes, rules: Rules) -> PartitionSpec:
  """('batch', 'length', 'embed') -> PartitionSpec(('data', 'fsdp'), None, None)."""
  spec = nn.logical_to_mesh_axes(tuple(names), flax_rules(rules))
  assert spec is not None  # flax returns None only when given no names
  return spec


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates `mesh` and `rules` for `constrain` inside the block (thread-local)."""
  previous = getattr(_state, "active", None)
  _state.active = (mesh, tuple(rules))
  try:
    yield
  finally:
    _state.active = previous


def active() -> Optional[tuple[Mesh, Rules]]:
  return getattr(_state, "active", None)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
  """Sharding constraint on an activation by logical names; identity without a mesh."""
  ctx = active()
  if ctx is None:
    return x
  mesh, rules = ctx
  if len(names) != x.ndim:
    raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {x.shape}")
  spec = logical_to_spec(names, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
