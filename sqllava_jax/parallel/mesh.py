"""The device mesh (`data`, `fsdp`, `tensor`) and shardings derived from logical axis names."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sqllava_jax.config import ConfigError, MeshConfig
from sqllava_jax.parallel.logical import Rules, logical_to_spec

AXES = ("data", "fsdp", "tensor")


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Fills the one `-1` axis with whatever is left; the product must equal the device count."""
  shape = list(cfg.shape)
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh {dict(zip(AXES, shape))}: at most one axis may be -1")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(AXES, shape))}: {num_devices} devices are not "
                        f"divisible by the fixed axes' product {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ConfigError(f"mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices; "
                      f"{num_devices} are available (set one axis to -1 to fill)")
  data, fsdp, tensor = shape
  return data, fsdp, tensor


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_shape(cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)  # CPU and odd topologies: plain order.
  return Mesh(grid, AXES)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (a tiny test model on 8 devices)."""
  out: list = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_sharding(names: Sequence[Optional[str]], shape: tuple[int, ...], mesh: Mesh,
                     rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, _fit(logical_to_spec(names, rules), shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding per variable of an (abstract) nnx state, from its `out_sharding` names."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return logical_sharding(names, tuple(var.shape), mesh, rules)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
