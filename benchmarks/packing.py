"""Tokens of real text per second: packed rows against one padded example per row.

    python benchmarks/packing.py [--rounds 3] [--layers 8] [--examples 96]

LLaVA-like examples: lengths uniform in 600..900 tokens, each with an image (BOS, 256
placeholders, then text), the answer half of the text trained. Both sides run the real
jitted train step of the mid-size model of `train_step.py` on the same 4096 token slots per
step:

  padded  4 rows x 1024 (the length bucket these examples fall in), one example per row;
  packed  2 rows x 2048 from the pipeline's packer (Grain first fit, 3 image slots per row),
          segment-masked attention, positions restarting per example.

Steps alternate between the two; the figures are medians. Real tokens are the rows'
non-padding positions; the packer's fill rate and examples per row are printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import Shapes, our_config  # noqa: E402  pylint: disable=wrong-import-position


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--examples", type=int, default=96)
  p.add_argument("--min-len", type=int, default=600)
  p.add_argument("--max-len", type=int, default=900)
  return p.parse_args()


def make_examples(n: int, lo: int, hi: int, s: Shapes, image_token_id: int, seed: int = 0):
  """Example dicts as the example builder makes them."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(lo, hi + 1))
    ids = rng.integers(3, s.vocab, length).astype(np.int32)
    ids[0], ids[1:1 + s.image_tokens] = 1, image_token_id
    labels = np.full(length, -100, np.int32)
    text = length - 1 - s.image_tokens
    labels[-text // 2:] = ids[-text // 2:]
    pixels = rng.integers(0, 256, (s.image, s.image, 3), dtype=np.uint8)
    out.append({"input_ids": ids, "labels": labels, "pixels": pixels, "example_index": i})
  return out


def padded_batches(examples, rows: int, length: int, s: Shapes):
  from sqllava_jax.data.examples import collate  # pylint: disable=g-import-not-at-top
  return [collate(examples[i:i + rows], batch_size=rows, length=length, image_size=s.image,
                  pad_id=0) for i in range(0, len(examples) - rows + 1, rows)]


def packed_batches(examples, rows: int, length: int, slots: int, s: Shapes):
  import grain  # pylint: disable=g-import-not-at-top

  from sqllava_jax.data import packing  # pylint: disable=g-import-not-at-top
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  ds = packing.pack(ds, length=length, image_slots=slots, max_examples=16, num_bins=rows,
                    image_size=s.image, pad_id=0, max_skips=10)
  packed = list(ds)
  return [packing.collate_packed(packed[i:i + rows], batch_size=rows, length=length,
                                 image_size=s.image, image_slots=slots, max_examples=16,
                                 pad_id=0) for i in range(0, len(packed) - rows + 1, rows)]


class Runner:
  """The real train step of one config over a list of host batches, in turn."""

  def __init__(self, cfg, batches):
    import jax  # pylint: disable=g-import-not-at-top

    from sqllava_jax.models.layers import unroll_threefry_on_cpu  # pylint: disable=g-import-not-at-top
    from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
    from sqllava_jax.training.program import TrainProgram  # pylint: disable=g-import-not-at-top
    unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
    self.program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), 1000)
    self.state = self.program.fresh_state(0)
    self.batches = batches
    self.next = 0
    first = self.program.global_batch(batches[0])
    self.step = self.program.train_step.lower(self.state, first).compile()

  def __call__(self) -> tuple[float, int]:
    """(seconds, real tokens) of one step on the next batch."""
    import jax  # pylint: disable=g-import-not-at-top
    host = self.batches[self.next % len(self.batches)]
    self.next += 1
    batch = self.program.global_batch(host)
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, int(host["attention_mask"].sum())


def configs(s: Shapes, slots: int):
  from sqllava_jax.config import replace  # pylint: disable=g-import-not-at-top
  base = our_config(dataclasses.replace(s, seq=2 * s.seq), "auto", 512)
  padded = replace(base, **{"data.max_length": s.seq, "train.per_device_batch_size": s.batch})
  packed = replace(base, **{"data.packing": True, "data.max_length": 2 * s.seq,
                            "data.max_images_per_row": slots,
                            "train.per_device_batch_size": s.batch // 2})
  return padded, packed


def describe(name: str, batches, s: Shapes) -> None:
  real = [b["attention_mask"].sum() / b["attention_mask"].size for b in batches]
  per_row = [(b["example_index"] >= 0).sum() / b["example_index"].shape[0] for b in batches]
  print(f"{name:<7} {len(batches)} batches of {batches[0]['input_ids'].shape}: slots filled "
        f"{np.mean(real):.1%}, {np.mean(per_row):.2f} examples per row")


def main() -> None:
  args = parse_args()
  s = Shapes(layers=args.layers)
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
  padded_cfg, packed_cfg = configs(s, slots=3)
  examples = make_examples(args.examples, args.min_len, args.max_len, s,
                           padded_cfg.model.image_token_id)
  batches = {"padded": padded_batches(examples, s.batch, s.seq, s),
             "packed": packed_batches(examples, s.batch // 2, 2 * s.seq, 3, s)}
  for name, b in batches.items():
    describe(name, b, s)
  runners = {"padded": Runner(padded_cfg, batches["padded"]),
             "packed": Runner(packed_cfg, batches["packed"])}
  for run in runners.values():  # warm-up
    run()
  rates = {n: [] for n in runners}
  for r in range(args.rounds):
    for name, run in runners.items():
      seconds, tokens = run()
      rates[name].append(tokens / seconds)
      print(f"  round {r}: {name:<7} {seconds:6.1f} s, {tokens} real tokens, "
            f"{tokens / seconds:6.1f} tokens/s, load {os.getloadavg()[0]:.1f}", flush=True)
  med = {n: statistics.median(v) for n, v in rates.items()}
  for name, v in med.items():
    print(f"{name:<7} median {v:7.1f} real tokens/s")
  print(f"packed / padded: {med['packed'] / med['padded']:.2f}x")
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
