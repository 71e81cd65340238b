"""`sqllava-jax train CONFIG [key=value ...]`: train into the config's `output_dir`, resuming
from its newest intact checkpoint. Multi-host runs start `jax.distributed` from the
environment (TPU pod, SLURM) or from the coordinator flags.

Exits 1 with one line naming the cause when another run holds the output directory, when no
checkpoint there is intact, or when a save fails (under `train.on_save_error: stop`, or the
last save); the checkpoints already written stay as they were.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  parser.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
  parser.add_argument("--num-processes", type=int, help="number of processes")
  parser.add_argument("--process-id", type=int, help="this process's index")


def run(args: argparse.Namespace) -> int:
  from sqllava_jax.parallel.multihost import maybe_initialize_distributed
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from sqllava_jax.config import load_config
  from sqllava_jax.models.layers import unroll_threefry_on_cpu
  from sqllava_jax.training.checkpoint import CheckpointSaveError, DamagedCheckpointError
  from sqllava_jax.training.run_lock import OutputDirLockedError
  from sqllava_jax.training.trainer import Trainer
  cfg = load_config(args.config, args.overrides)
  unroll_threefry_on_cpu()  # process-wide: see its docstring
  try:
    summary = Trainer(cfg).run()
  except (OutputDirLockedError, DamagedCheckpointError, CheckpointSaveError) as e:
    print(f"sqllava-jax train: error: {e}", file=sys.stderr, flush=True)
    return 1
  import jax
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
  return 0
