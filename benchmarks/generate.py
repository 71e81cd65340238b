"""Tokens/s of batched greedy generation: ours vs transformers' `generate` on the same weights.

    python benchmarks/generate.py [--repeats 3] [--batches 1 8] [--layers 8]

A mid-size random LLaMA (width 1024, 8 layers, 16 heads, MLP 2816, vocab 32000, fp32),
prompts of 32 tokens, 128 new tokens (no row stops early). Runs alternate between the two
implementations and report medians. Decoding one token at batch 1 reads every weight once,
so the effective weight-read rate per decode step is compared with the machine's memory
bandwidth, measured here with a large numpy copy. Report the load average with the numbers:
the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--mlp", type=int, default=2816)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--skip-hf", action=argparse.BooleanOptionalAction, default=False)
  return p.parse_args()


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
  """(bytes/s of a large numpy copy, each byte read and written once; bytes/s of a jitted
  sum over the same array, each byte read once, on every core), best of a few runs."""
  import jax  # pylint: disable=g-import-not-at-top
  src = np.ones(int(gib * 2**30) // 4, np.float32)
  dst = np.empty_like(src)
  on_device = jax.device_put(src)
  total = jax.jit(lambda a: a.sum())
  total(on_device).block_until_ready()
  copy = read = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    copy = min(copy, time.perf_counter() - t)
    t = time.perf_counter()
    total(on_device).block_until_ready()
    read = min(read, time.perf_counter() - t)
  return 2 * src.nbytes / copy, src.nbytes / read


def build_models(args, directory: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from sqllava_jax.convert.hf import llama_from_hf  # pylint: disable=g-import-not-at-top
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.heads, max_position_embeddings=2048, tie_word_embeddings=False,
      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(directory)
  hf.generation_config.eos_token_id = None  # every run generates exactly `--new` tokens
  return hf, llama_from_hf(directory)


def weight_bytes_per_step(args) -> int:
  """Weights one decode step reads: every layer, the final norm and `lm_head` (the
  embedding table contributes one row per token)."""
  d, f = args.hidden, args.mlp
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return 4 * (args.layers * per_layer + d + d * args.vocab)


def ours_runner(model, prompts):
  from sqllava_jax.evaluation.generate import Generator  # pylint: disable=g-import-not-at-top
  gen = Generator(model, eos_id=-1, pad_id=0)  # no token is -1: rows never stop early

  def run(new: int) -> float:
    start = time.perf_counter()
    out = gen.generate(prompts, max_new_tokens=new)
    elapsed = time.perf_counter() - start
    assert int(out.num_new.min()) == new, out.num_new
    return elapsed

  return run


def hf_runner(hf, prompts):
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.tensor(prompts)

  def run(new: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return elapsed

  return run


def measure(runners: dict, args) -> dict:
  """{name: (seconds for `--new` tokens, prefill seconds)} as lists over repeats; the
  implementations alternate, so load from elsewhere hits both alike."""
  for run in runners.values():  # compile / warm up both lengths
    run(args.new), run(1)
  times = {name: ([], []) for name in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      times[name][0].append(run(args.new))
      times[name][1].append(run(1))
  return times


def report(batch: int, times: dict, args, bandwidth: float) -> None:
  """Medians (and the best run, less disturbed by other load)."""
  weights = weight_bytes_per_step(args)
  for name, (full, prefill) in times.items():
    total, first = statistics.median(full), statistics.median(prefill)
    step = (total - first) / (args.new - 1)
    print(f"batch {batch:>2} {name:<12} {batch * args.new / total:7.1f} tok/s "
          f"(best {batch * args.new / min(full):.1f})  {1e3 * step:6.1f} ms/step  weights "
          f"{weights / step / 1e9:5.1f} GB/s ({weights / step / bandwidth:.0%} of measured "
          f"bandwidth)  prefill {1e3 * first:.0f} ms")
  if "transformers" in times:
    ours, theirs = times["sqllava-jax"][0], times["transformers"][0]
    print(f"batch {batch:>2} ratio sqllava-jax / transformers: "
          f"{statistics.median(theirs) / statistics.median(ours):.2f}x (medians), "
          f"{min(theirs) / min(ours):.2f}x (best runs)")


def main() -> None:
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  copy, read = memory_bandwidth()
  bandwidth = max(copy, read)
  print(f"memory bandwidth: numpy copy (read + write) {copy / 1e9:.1f} GB/s, jitted sum (read) "
        f"{read / 1e9:.1f} GB/s; weights read per decode step: "
        f"{weight_bytes_per_step(args) / 1e6:.0f} MB")
  with tempfile.TemporaryDirectory() as directory:
    hf, ours = build_models(args, directory)
  rng = np.random.default_rng(0)
  for batch in args.batches:
    prompts = rng.integers(3, args.vocab, size=(batch, args.prompt)).tolist()
    runners = {"sqllava-jax": ours_runner(ours, prompts)}
    if not args.skip_hf:
      runners["transformers"] = hf_runner(hf, prompts)
    report(batch, measure(runners, args), args, bandwidth)
    print(f"load average now {os.getloadavg()}", flush=True)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
