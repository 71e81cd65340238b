"""Step time of the tiny config's train step on 1 device vs 8 simulated CPU devices.

    python benchmarks/tiny_train_step.py [--steps 20] [--batch 8]

Same global batch on both meshes (8 rows of `data.max_length` tokens); random tokens and
images (no input pipeline), medians of `--steps` timed steps after one warm-up step. On a
CPU the 8 "devices" share the same cores, so this shows the partitioning overhead, not a
speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sqllava_jax.config import MeshConfig, load_config  # noqa: E402
from sqllava_jax.models.layers import unroll_threefry_on_cpu  # noqa: E402
from sqllava_jax.parallel.mesh import make_mesh  # noqa: E402
from sqllava_jax.training.program import TrainProgram  # noqa: E402


def random_rows(cfg, rows: int, rng: np.random.Generator) -> dict:
  t, p, size = cfg.data.max_length, cfg.model.num_image_tokens, cfg.model.vision.image_size
  ids = rng.integers(3, cfg.model.llm.vocab_size, size=(rows, t)).astype(np.int32)
  ids[:, 1:1 + p] = cfg.model.image_token_id
  labels = np.where(ids == cfg.model.image_token_id, -100, ids).astype(np.int32)
  return {"input_ids": ids, "labels": labels, "attention_mask": np.ones((rows, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
          "segment_ids": np.ones((rows, t), np.int32),
          "pixel_values": rng.normal(size=(rows, size, size, 3)).astype(np.float32)}


def time_steps(cfg, mesh, rows: int, steps: int) -> float:
  unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
  program = TrainProgram(cfg, mesh, total_steps=steps + 1)
  state = program.fresh_state(cfg.seed)
  batch = program.global_batch(random_rows(cfg, rows, np.random.default_rng(0)))
  state, m = program.train_step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = program.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
  args = parser.parse_args()
  base = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
  print(f"load average {os.getloadavg()[0]:.2f}; tiny config, global batch {args.batch} x "
        f"{base.data.max_length} tokens")
  results = {}
  for name, shape, per_device in (("1 device", (1, 1, 1), args.batch),
                                  ("8 devices (data=8)", (8, 1, 1), args.batch // 8),
                                  ("8 devices (fsdp=4, tensor=2)", (1, 4, 2), args.batch // 8)):
    n = shape[0] * shape[1] * shape[2]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"train.per_device_batch_size={per_device}"])
    mesh = make_mesh(MeshConfig(*shape), devices=jax.devices()[:n])
    rows = per_device * n
    results[name] = time_steps(cfg, mesh, rows, args.steps)
    print(f"{name:<30} {results[name] * 1e3:8.1f} ms/step (median of {args.steps})", flush=True)
  ratio = results["8 devices (data=8)"] / results["1 device"]
  print(f"8 devices (data=8) / 1 device: {ratio:.2f}x")


if __name__ == "__main__":
  main()
