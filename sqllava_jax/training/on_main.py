"""Decisions that process 0 takes for every process of a run.

The output directory is shared storage; its bookkeeping (the run lock, which checkpoint is
intact) is read and written by process 0 alone, and every process must act on the same
answer, or they part ways at the next collective and hang there. `on_main` runs the decision
on process 0 and broadcasts its integer result (one small collective; nothing with one
process). An error on process 0 is raised there and, as `elsewhere()`, on the others.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

_FAILED = np.iinfo(np.int32).min


def on_main(decide: Callable[[], int], *, elsewhere: Callable[[], Exception]) -> int:
  """`decide()` (an int32) run on process 0, returned on every process."""
  if jax.process_count() == 1:
    return decide()
  from jax.experimental import multihost_utils
  value, error = _FAILED, None
  if jax.process_index() == 0:
    try:
      value = int(decide())
    except Exception as e:  # re-raised below, once the others know to stop
      error = e
  value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  if error is not None:
    raise error
  if value == _FAILED:
    raise elsewhere()
  return value


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
