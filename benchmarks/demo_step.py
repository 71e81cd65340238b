"""Step time of the demo's stage-0 and stage-2 train steps, per attention implementation.

    python benchmarks/demo_step.py [--steps 6] [--rounds 3] [--impls xla blocked]

The demo's own configs (`sqllava_jax/demo/stage{0,2}.yaml`) on packed batches from its input
pipeline, over a small synthetic set generated in a temporary directory. Every variant is
compiled first; then the variants take turns, `--steps` timed steps each per round, so a
change in the machine's load falls on all of them. Prints the median seconds per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sqllava_jax.data.pipeline import make_pipeline  # noqa: E402
from sqllava_jax.demo import configs, synthetic  # noqa: E402
from sqllava_jax.models.layers import unroll_threefry_on_cpu  # noqa: E402
from sqllava_jax.parallel.mesh import make_mesh  # noqa: E402
from sqllava_jax.training.program import TrainProgram  # noqa: E402

BATCHES = 4  # distinct batches, cycled


class Variant:
  """One stage's train step under one attention implementation, compiled, with its batches."""

  def __init__(self, stage: str, impl: str, data_dir: str, out_dir: str):
    self.name = f"{stage}, attention {impl}"
    cfg = configs.load_config(configs.config_file(stage), [
        f"output_dir={out_dir}", f"data.synthetic.dir={data_dir}",
        "data.synthetic.num_train=400", f"model.attention_impl={impl}"])
    self.shape = (f"{cfg.train.per_device_batch_size} x {cfg.data.max_length} tokens, "
                  f"attention block {cfg.model.attention_block_size}")
    synthetic.ensure_dataset(cfg.data.synthetic, image_size=cfg.model.vision.image_size)
    rows = iter(make_pipeline(cfg, batch_size=cfg.train.per_device_batch_size))
    unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
    self.program = TrainProgram(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]),
                                total_steps=1000)
    self.state = self.program.fresh_state(cfg.seed)
    self.batches = [self.program.global_batch(next(rows)) for _ in range(BATCHES)]
    self.times: list[float] = []
    self.step(0)  # compile

  def step(self, i: int) -> float:
    t0 = time.perf_counter()
    self.state, metrics = self.program.train_step(self.state, self.batches[i % BATCHES])
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--impls", nargs="+", default=["xla", "blocked"])
  parser.add_argument("--stages", nargs="+", default=["stage0", "stage2"])
  args = parser.parse_args()
  print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.steps} steps")
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    variants = [Variant(s, impl, data, os.path.join(tmp, f"{s}-{impl}"))
                for s in args.stages for impl in args.impls]
    for _ in range(args.rounds):
      for v in variants:
        v.times += [v.step(i) for i in range(args.steps)]
  for v in variants:
    print(f"{v.name:<28} {statistics.median(v.times):6.3f} s/step "
          f"(min {min(v.times):.3f}; {v.shape})")
  print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
  main()
