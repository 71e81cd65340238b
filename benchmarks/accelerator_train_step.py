"""Tokens/s and MFU of a config's real train step on this host's accelerators, random weights.

    python benchmarks/accelerator_train_step.py [--config configs/sqllava_7b_stage2.yaml]
        [--batch 4] [--seq 2048] [--steps 10] [--peak-tflops T] [key=value ...]

Meant for one GPU (H100/H200) or a TPU host: the 7B stage-2 step (LLM-LoRA + projector +
ViT-LoRA trained, bfloat16 frozen bases) with the per-device batch and remat policy that
`sqllava-jax plan` chose, every local device in one fsdp mesh. No input pipeline: random
tokens and images of the configured shapes, the image placeholders where the data would put
them, every text position trained.

MFU = model FLOPs per step / step time / (devices x the chip's dense bfloat16 peak). Model
FLOPs are analytical (`training.flops`): forward, the input-gradient backward through every
layer, and weight gradients only for trainable weights (frozen bases get none); remat's
recomputation is not counted. The peak comes from the device kind (table below) or
`--peak-tflops`. Prints one line per timed step, then the medians and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bfloat16 peak per chip, TFLOP/s (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0,
                    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0,
                    "tpu v6 lite": 918.0, "tpu v6e": 918.0}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "sqllava_7b_stage2.yaml"))
  p.add_argument("--batch", type=int, default=4, help="per-device rows per step")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10, help="timed steps, after two warm-up steps")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="per-chip dense bf16 peak; default from the device kind")
  p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
  return p.parse_args()


def chip_peak(kind: str, given: float | None) -> float | None:
  if given:
    return given * 1e12
  kind = kind.lower()
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None


def random_batch(cfg, rows: int, seq: int, rng: np.random.Generator) -> dict:
  """BOS, the image placeholders, then random text, every text position trained."""
  images, size = cfg.model.num_image_tokens, cfg.model.vision.image_size
  ids = rng.integers(3, cfg.model.llm.vocab_size, size=(rows, seq)).astype(np.int32)
  ids[:, 0], ids[:, 1:1 + images] = 1, cfg.model.image_token_id
  labels = np.where(ids == cfg.model.image_token_id, -100, ids).astype(np.int32)
  labels[:, 0] = -100
  return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
          "segment_ids": np.ones_like(ids),
          "pixel_values": rng.normal(size=(rows, size, size, 3)).astype(np.float32)}


def main() -> None:
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  from sqllava_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from sqllava_jax.models.layers import unroll_threefry_on_cpu  # pylint: disable=g-import-not-at-top
  from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from sqllava_jax.training import flops  # pylint: disable=g-import-not-at-top
  from sqllava_jax.training.program import TrainProgram  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  n = len(devices)
  cfg = load_config(args.config, ["mesh.data=1", f"mesh.fsdp={n}", "mesh.tensor=1",
                                  f"train.per_device_batch_size={args.batch}",
                                  f"data.max_length={args.seq}", "train.grad_accum_steps=1",
                                  *args.overrides])
  kind = devices[0].device_kind
  print(f"{n} x {kind} ({devices[0].platform}); jax {jax.__version__}; config {args.config}; "
        f"batch {args.batch}/device x {args.seq} tokens; remat {cfg.model.remat_policy}; "
        f"attention {cfg.model.attention_impl}", flush=True)
  unroll_threefry_on_cpu()  # as the train command lowers dropout's RNG
  program = TrainProgram(cfg, make_mesh(cfg.mesh, devices), total_steps=args.steps + 2)
  start = time.perf_counter()
  state = program.fresh_state(cfg.seed)
  rows = args.batch * n
  batch = program.global_batch(random_batch(cfg, rows, args.seq, np.random.default_rng(0)))
  step = program.train_step.lower(state, batch).compile()
  print(f"initialised and compiled in {time.perf_counter() - start:.0f} s", flush=True)
  for _ in range(2):  # warm-up
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    loss = float(jax.block_until_ready(metrics)["loss"])
    seconds.append(time.perf_counter() - t0)
    print(f"  step {i}: {seconds[-1]:.3f} s, loss {loss:.4f}", flush=True)

  parts = flops.step_flops(cfg.model, program.trainable, rows, args.seq)
  model = flops.total(parts)
  med = statistics.median(seconds)
  peak = chip_peak(kind, args.peak_tflops)
  result = {"device": kind, "devices": n, "config": os.path.relpath(args.config, ROOT),
            "per_device_batch": args.batch, "seq_len": args.seq,
            "remat": cfg.model.remat_policy, "attention": cfg.model.attention_impl,
            "step_s_median": med, "tokens_per_s": rows * args.seq / med,
            "model_tflop_per_step": model.total / 1e12,
            "model_tflops_achieved": model.total / med / 1e12,
            "flops_counted": "forward + input gradients + trainable weight gradients only "
                             "(no frozen weight gradients, no remat recomputation)",
            "peak_tflops_per_chip": peak / 1e12 if peak else None,
            "mfu": model.total / med / (peak * n) if peak else None}
  print(f"median {med:.3f} s/step: {result['tokens_per_s']:.0f} tokens/s, "
        f"{result['model_tflops_achieved']:.1f} model TFLOP/s"
        + (f", MFU {result['mfu']:.1%} of {n} x {peak / 1e12:.0f} TFLOP/s" if peak else
           " (no peak known for this device: pass --peak-tflops)"))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
