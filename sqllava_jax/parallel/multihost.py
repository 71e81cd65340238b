"""Multi-host start-up: call `jax.distributed.initialize()` when, and only when, it is needed.

Every entry point that may run as one of several processes calls
`maybe_initialize_distributed()` before its first JAX computation. Where the processes come
from decides what happens:

| environment                                   | decision                                  |
|-----------------------------------------------|-------------------------------------------|
| `SQLLAVA_NUM_PROCESSES=1` (or the argument)   | single process, even inside a cluster job |
| explicit coordinator, process count and id    | initialize with exactly those             |
| (arguments, or `SQLLAVA_COORDINATOR`,         |                                           |
| `SQLLAVA_NUM_PROCESSES`, `SQLLAVA_PROCESS_ID`)|                                           |
| an `srun` step with `SLURM_NTASKS` > 1        | initialize; JAX reads the rest from SLURM |
| a TPU slice with more than one host           | initialize; JAX reads the TPU metadata    |
| anything else (a laptop, one GPU node, ...)   | nothing: single process                   |

JAX 0.10 can detect SLURM and Cloud TPU by itself (`jax._src.clusters`), but calling
`jax.distributed.initialize()` unconditionally is wrong in two common cases: on a machine
with no cluster it raises ("coordinator_address should be defined"), and in an `ssh` session
into a SLURM node (only some `SLURM_*` variables set) it used to fail with a `KeyError`
(jax-ml/jax#30073). So we decide ourselves, and let JAX fill in the details.

Under SLURM with one process per node, JAX would make only GPU `SLURM_LOCALID` (0) visible
to each process; the launcher (`launch/gpu_slurm.sbatch --per-node`) sets
`JAX_LOCAL_DEVICE_IDS=0,1,...` so each process drives all GPUs of its node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "SQLLAVA_COORDINATOR"
ENV_NUM_PROCESSES = "SQLLAVA_NUM_PROCESSES"
ENV_PROCESS_ID = "SQLLAVA_PROCESS_ID"
# JAX reads this one itself; we honour it too so both spellings agree.
ENV_JAX_COORDINATOR = "JAX_COORDINATOR_ADDRESS"

# What JAX's SlurmCluster needs to find the coordinator and this process's rank; these are
# set inside an `srun` step (not in an `ssh` session onto an allocated node).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
  """What `maybe_initialize_distributed` does, and why (logged, and read by tests)."""
  source: str  # "single" | "explicit" | "slurm" | "tpu" | "already"
  reason: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  # Passed to `jax.distributed.initialize` to fill what is not given explicitly.
  cluster_detection_method: Optional[str] = None

  @property
  def initialize(self) -> bool:
    return self.source not in ("single", "already")


def _int_or_none(value, name: str) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _check_coordinator(address: str, name: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"{name}={address!r}: give host:port of process 0, e.g. 10.0.0.1:1234")


def _slurm_tasks(env: Mapping[str, str]) -> tuple[int, bool]:
  """(tasks in this SLURM step or job, whether we are inside an `srun` step)."""
  ntasks = _int_or_none(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1
  return ntasks, all(var in env for var in _SLURM_STEP_VARS)


def tpu_process_count() -> int:
  """Processes (hosts x slices) of this Cloud TPU job per JAX's own detection; 0 off TPU.

  Off a TPU VM JAX answers without any network call; on one it reads the GCE metadata server
  (or, on GKE, `TPU_WORKER_HOSTNAMES`), exactly as `jax.distributed.initialize()` will.
  """
  # Private module, but the same code `jax.distributed.initialize()` runs; jax is pinned <0.11.
  from jax._src import clusters
  for cluster in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
    if cluster.is_env_present():
      return cluster.get_process_count()
  return 0


def plan_distributed(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, *,
                     env: Mapping[str, str] = os.environ,
                     tpu_processes: Callable[[], int] = tpu_process_count) -> DistributedPlan:
  """Decides whether and how to start distributed JAX; pure apart from `tpu_processes()`.

  Arguments win over `SQLLAVA_*` variables, which win over cluster detection. Partial explicit
  values inside a detected cluster are allowed (e.g. only a coordinator, to pick the port);
  outside one all three are required.
  """
  coordinator = (coordinator_address or env.get(ENV_COORDINATOR)
                 or env.get(ENV_JAX_COORDINATOR) or None)
  num = (_int_or_none(num_processes, "num_processes") if num_processes is not None
         else _int_or_none(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES))
  pid = (_int_or_none(process_id, "process_id") if process_id is not None
         else _int_or_none(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID))
  if num is not None and num < 1:
    raise ValueError(f"num_processes={num} ({ENV_NUM_PROCESSES}) must be >= 1")
  if num == 1:
    return DistributedPlan("single", f"{ENV_NUM_PROCESSES}=1 asks for one process")
  if coordinator is not None:
    _check_coordinator(coordinator, ENV_COORDINATOR)
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ValueError(f"process_id={pid} ({ENV_PROCESS_ID}) must be in 0..{num - 1} "
                     f"for num_processes={num}")

  cluster, why = _detect_cluster(env, tpu_processes)
  explicit: dict[str, Any] = dict(coordinator_address=coordinator, num_processes=num,
                                  process_id=pid)
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and cluster is None:
    missing = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
               "process_id": ENV_PROCESS_ID}
    absent = [f"{k} ({var})" for k, var in missing.items() if k not in given]
    if absent:
      raise ValueError(
          f"multi-process start-up got {', '.join(f'{k}={v}' for k, v in given.items())} but "
          f"no SLURM or TPU cluster to fill in the rest; also give {', '.join(absent)}, "
          f"or set {ENV_NUM_PROCESSES}=1 for a single process")
    return DistributedPlan("explicit", "coordinator, process count and id given explicitly",
                           **explicit, cluster_detection_method="deactivate")
  if cluster is None:
    return DistributedPlan("single", why)
  return DistributedPlan(cluster, why + (f"; explicit {sorted(given)}" if given else ""),
                         **explicit, cluster_detection_method=_JAX_METHOD[cluster])


# Our cluster name -> `cluster_detection_method` for JAX. TPU is left to JAX, which picks
# between its GKE and GCE variants.
_JAX_METHOD = {"slurm": "slurm", "tpu": None}


def _detect_cluster(env: Mapping[str, str],
                    tpu_processes: Callable[[], int]) -> tuple[Optional[str], str]:
  ntasks, in_step = _slurm_tasks(env)
  if ntasks > 1 and in_step:
    return "slurm", f"srun step with SLURM_NTASKS={ntasks}"
  if ntasks > 1:
    # The batch script itself (or an ssh session) sees the job's task count but is one
    # process; starting a coordinator here would wait forever for the others.
    logger.warning("SLURM_NTASKS=%d but this process is not in an srun step; running as a "
                   "single process (launch with srun, e.g. launch/gpu_slurm.sbatch)", ntasks)
  hosts = tpu_processes()
  if hosts > 1:
    return "tpu", f"TPU job with {hosts} host processes"
  return None, "no multi-process cluster detected"


_STATE: dict[str, DistributedPlan] = {}


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> DistributedPlan:
  """Calls `jax.distributed.initialize()` if this is one process of several; idempotent.

  Call it before any JAX computation (`jax.devices()` included). Returns the plan it acted
  on; later calls return the first plan and do nothing.
  """
  if "plan" in _STATE:
    return _STATE["plan"]
  if jax.distributed.is_initialized():
    plan = DistributedPlan("already", "jax.distributed was initialized by the caller")
  else:
    plan = plan_distributed(coordinator_address, num_processes, process_id)
  if plan.initialize:
    logger.info("starting distributed JAX (%s): %s", plan.source, plan.reason)
    jax.distributed.initialize(coordinator_address=plan.coordinator_address,
                               num_processes=plan.num_processes,
                               process_id=plan.process_id,
                               cluster_detection_method=plan.cluster_detection_method)
  else:
    logger.info("single-process JAX: %s", plan.reason)
  _STATE["plan"] = plan
  return plan
