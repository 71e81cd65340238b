"""What the checkpoint manifest costs: hashing speed per GB, and its share of a save, on the
7B stage-2 plan.

What a save writes is taken from the trainer's own program for
`configs/sqllava_7b_stage2.yaml` (`TrainProgram.abstract_state`, the tree `Trainer._save`
hands to orbax): every parameter, the frozen bf16 bases included, the optimizer state of the
trainable groups, the step and the RNG; about 18.6 GB. Writing that much for a benchmark is
not needed: the save and the manifest both grow linearly with the bytes, so a scaled-down
state with the same dtype mix (`--gb`, normal-distributed values like weights, in leaves of
at most 256 MiB) is saved with our `Checkpointer` and the per-GB rates are extrapolated to
the plan's bytes.

Measured, on one machine, in one process:
  1. each candidate checksum over in-memory buffers, one thread (GB/s): zlib's crc32 (what
     the manifest uses) and adler32, hashlib's blake2b, sha256, sha1 and md5;
  2. a blocking save of the scaled state (orbax writing, then our manifest in its commit),
     the manifest timed on its own;
  3. checking the saved step against its manifest (`integrity.verify`), with the manifest's
     thread pool and with one thread.
The files are hashed right after they were written, from the page cache, as at commit time;
a restore on a cold cache reads them from disk, which restoring does anyway.

    python benchmarks/checkpoint_integrity.py [--gb 2] [--dir /where/checkpoints/go]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib

import jax
import ml_dtypes
import numpy as np

from sqllava_jax.config import load_config
from sqllava_jax.models.layers import unroll_threefry_on_cpu
from sqllava_jax.parallel.mesh import make_mesh
from sqllava_jax.training import integrity
from sqllava_jax.training.checkpoint import Checkpointer
from sqllava_jax.training.program import TrainProgram

PLAN = os.path.join(os.path.dirname(__file__), "..", "configs", "sqllava_7b_stage2.yaml")
GB = 1e9
LEAF_BYTES = 256 << 20


def plan_bytes(config: str = PLAN) -> dict[str, int]:
  """Bytes a save of `config`'s training state writes, by dtype (shapes only, nothing built)."""
  cfg = load_config(config)
  unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
  program = TrainProgram(cfg, make_mesh(cfg.mesh), total_steps=1)
  out: dict[str, int] = collections.Counter()
  for leaf in jax.tree.leaves(program.abstract_state):
    out[str(leaf.dtype)] += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return dict(out)


def scaled_state(by_dtype: dict[str, int], total_bytes: float, seed: int = 0) -> dict:
  """Host arrays with `by_dtype`'s mix of bf16 / fp32 bytes, `total_bytes` in all."""
  rng = np.random.default_rng(seed)
  share = {"bfloat16": by_dtype.get("bfloat16", 0) / sum(by_dtype.values())}
  share["float32"] = 1.0 - share["bfloat16"]
  state = {}
  for name, frac in share.items():
    dtype = ml_dtypes.bfloat16 if name == "bfloat16" else np.float32
    left = int(total_bytes * frac) // np.dtype(dtype).itemsize
    i = 0
    while left > 0:
      n = min(left, LEAF_BYTES // np.dtype(dtype).itemsize)
      state[f"{name}_{i:03d}"] = rng.standard_normal(n, dtype=np.float32).astype(dtype)
      left, i = left - n, i + 1
  return state


def checksum_speeds(nbytes: int, repeats: int = 3) -> dict[str, float]:
  """GB/s of each candidate over one in-memory buffer, one thread (best of `repeats`)."""
  data = memoryview(np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8))
  candidates = {"crc32": lambda b: zlib.crc32(b), "adler32": lambda b: zlib.adler32(b)}
  for name in ("blake2b", "sha256", "sha1", "md5"):
    candidates[name] = lambda b, name=name: hashlib.new(name, b).digest()
  speeds = {}
  for name, fn in candidates.items():
    best = min(_timed(fn, data)[1] for _ in range(repeats))
    speeds[name] = nbytes / GB / best
  return speeds


def _timed(fn, *args, **kwargs):
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t0


def save_and_check(state: dict, directory: str) -> dict[str, float]:
  """Seconds of one blocking save (with its manifest), of the manifest alone, and of checks."""
  manifest_s = []
  write_manifest = integrity.write_manifest

  def timed_manifest(step_dir):
    manifest, seconds = _timed(write_manifest, step_dir)
    manifest_s.append(seconds)
    return manifest

  ckpt = Checkpointer(directory, async_save=False)
  integrity.write_manifest = timed_manifest  # what the commit hook calls
  try:
    _, save_s = _timed(ckpt.save, 1, params=state, meta={"benchmark": True}, force=True)
  finally:
    integrity.write_manifest = write_manifest
  ckpt.close()
  step_dir = os.path.join(directory, "1")
  problems, verify_s = _timed(integrity.verify, step_dir)
  assert not problems, problems
  workers = integrity._worker_count
  integrity._worker_count = lambda: 1
  try:
    _, verify_1_s = _timed(integrity.verify, step_dir)
  finally:
    integrity._worker_count = workers
  return {"save_s": save_s, "manifest_s": manifest_s[0], "verify_s": verify_s,
          "verify_one_thread_s": verify_1_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=2.0, help="bytes of the scaled-down state")
  parser.add_argument("--dir", default=None, help="where to write (the checkpoint disk)")
  parser.add_argument("--hash-mb", type=int, default=256, help="buffer for the checksum speeds")
  args = parser.parse_args()
  load = os.getloadavg()[0]
  by_dtype = plan_bytes()
  plan_total = sum(by_dtype.values())
  state = scaled_state(by_dtype, args.gb * GB)
  written = sum(a.nbytes for a in state.values())
  speeds = checksum_speeds(args.hash_mb << 20)
  work = tempfile.mkdtemp(prefix="ckpt_integrity_", dir=args.dir)
  try:
    t = save_and_check(state, os.path.join(work, "checkpoints"))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  per_gb = {k: v / (written / GB) for k, v in t.items()}
  report = {
      "plan": os.path.relpath(PLAN), "plan_bytes_by_dtype": by_dtype, "plan_gb": plan_total / GB,
      "scaled_gb": written / GB, "cpus": os.cpu_count(), "workers": integrity._worker_count(),
      "load_average": [load, os.getloadavg()[0]],
      "checksum_gb_per_s_one_thread": {k: round(v, 3) for k, v in speeds.items()},
      "measured_s": {k: round(v, 3) for k, v in t.items()},
      "plan_s": {k: round(v * plan_total / GB, 1) for k, v in per_gb.items()},
      "manifest_share_of_save": round(t["manifest_s"] / (t["save_s"] - t["manifest_s"]), 4),
  }
  print(json.dumps(report, indent=1))
  print(f"manifest ({integrity.ALGORITHM}, {report['workers']} threads): "
        f"{written / GB / t['manifest_s']:.2f} GB/s; "
        f"{100 * report['manifest_share_of_save']:.1f} % of orbax's write time (goal < 5 %); "
        f"7B plan ({plan_total / GB:.1f} GB): save {report['plan_s']['save_s']} s of which "
        f"manifest {report['plan_s']['manifest_s']} s, check at restore "
        f"{report['plan_s']['verify_s']} s")


if __name__ == "__main__":
  main()
