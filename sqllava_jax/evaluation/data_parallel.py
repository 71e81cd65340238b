"""Data-parallel evaluation: the batch split over the mesh's `data` and `fsdp` axes.

Evaluation keeps the weights replicated and splits only the batch (the leading axis); each
process passes its own rows and gets its own rows back, and reads only its shard of the
questions (`batch_rows`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def eval_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """All devices on the `data` axis (fsdp and tensor of size 1): the evaluation mesh."""
  grid = np.asarray(list(devices if devices is not None else jax.devices()))
  return Mesh(grid.reshape(-1, 1, 1), ("data", "fsdp", "tensor"))


def eval_mesh_if_parallel() -> Optional[Mesh]:
  """The evaluation mesh when there is more than one device or process, else None (one
  device needs no sharding)."""
  if jax.device_count() == 1:
    return None
  return eval_mesh()


def batch_ways(mesh: Mesh) -> int:
  """How many slices the batch is split into."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh: Mesh, ndim: int) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def check_batch_size(mesh: Mesh, global_batch: int) -> None:
  ways = batch_ways(mesh)
  if global_batch % ways:
    raise ValueError(f"batch size {global_batch} is not divisible by the {ways} data-parallel "
                     f"slices of the mesh; choose a multiple of {ways}")


def shard_batch(mesh: Mesh, arrays: Sequence[Any]) -> tuple:
  """This process's rows of each array (None passes through) -> global arrays split on the
  leading axis."""
  out: list[Any] = []
  for a in arrays:
    if a is None:
      out.append(None)
      continue
    sharding = batch_spec(mesh, np.ndim(a))
    global_rows = np.shape(a)[0] * jax.process_count()
    check_batch_size(mesh, global_rows)
    out.append(jax.make_array_from_process_local_data(sharding, np.asarray(a)))
  return tuple(out)


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-split global array that live on this process, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards: dict[int, np.ndarray] = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def batch_rows(total: int, global_batch: int, batch: int, process_index: int,
               process_count: int) -> range:
  """The items (of `total`) this process holds in global batch `batch`: its contiguous block
  of the batch, process 0's first, as the global array lays the rows out. So every item
  keeps its global row whatever the process count, and a sampled run draws the same on one
  process as on many. Fewer than `global_batch // process_count` at the end: padding rows."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in 0..{process_count - 1}")
  local = global_batch // process_count
  start = batch * global_batch + process_index * local
  return range(min(start, total), min(start + local, total))


def num_batches(total: int, global_batch: int) -> int:
  """Global batches of `total` items (every process runs each: collectives need all
  processes to run the same number of steps; short ones run padding rows)."""
  return -(-total // global_batch)


def agree_max(value: int) -> int:
  """The largest `value` over all processes (each passes its own)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
