"""Tokens/s of batched greedy generation: ours vs transformers' `generate` on the same weights.

    python benchmarks/generate.py [--repeats 3] [--batches 1 8] [--layers 8] [--cores N]
                                  [--profile]

A mid-size random LLaMA (width 1024, 8 layers, 16 heads, MLP 2816, vocab 32000, fp32),
prompts of 32 tokens, 128 new tokens (no row stops early). Each implementation runs in a
worker process of its own (`ab.py`: two frameworks' thread pools in one process slow each
other down); runs alternate between the two and report medians. Decoding one token at
batch 1 reads every weight once, so the effective weight-read rate per decode step is
compared with the machine's memory bandwidth, measured here with a large numpy copy and a
jitted sum. Report the load average with the numbers: the machine may be shared.
`--profile` also traces one of our runs per batch size with `jax.profiler` and prints where
its device time goes, per operation (the shares hold on a busy machine too).

`--cores N` (N > 1) also runs ours split over N simulated CPU devices, the weights, KV
cache and activations sharded over a `tensor` mesh axis (what `XLA_FLAGS=
--xla_force_host_platform_device_count=N ... --mesh tensor=N` gives a user). On a quiet
2-core machine it bought nothing: XLA already runs a decode step on both cores (process CPU
time about 1.8x wall time at batch 8); only on a busy machine did it help.
"""

from __future__ import annotations

import argparse
import contextlib
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
  p.add_argument("--cores", type=int, default=1,
                 help="also run ours split over this many simulated devices (tensor axis)")
  p.add_argument("--skip-hf", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                 help="print our per-operation time breakdown at each batch size")
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


class HFWorker:
  """The transformers model, built from a seeded random init and saved to `directory` (ours
  loads it from there), served by `ab.Side` in a process of its own."""

  def __init__(self, args, directory: str):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    self.hf = transformers.LlamaForCausalLM(cfg).eval()
    self.hf.save_pretrained(directory)
    self.hf.generation_config.eos_token_id = None  # every run generates exactly `new` tokens
    self.header = f"torch {torch.__version__} with {torch.get_num_threads()} threads"

  def info(self) -> dict:
    return {"header": self.header}

  def run(self, prompts, new: int) -> float:
    import torch  # pylint: disable=g-import-not-at-top
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
      out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return elapsed


class OursWorker:
  """Our model imported from the transformers directory, on one device or (`cores` > 1)
  sharded over `cores` simulated CPU devices on a tensor axis; with the memory-bandwidth
  probe on one device."""

  def __init__(self, directory: str, cores: int = 1):
    if cores > 1:  # this worker process has not imported jax yet
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={cores}")
    import jax  # pylint: disable=g-import-not-at-top

    from sqllava_jax.config import MeshConfig  # pylint: disable=g-import-not-at-top
    from sqllava_jax.convert.hf import llama_from_hf  # pylint: disable=g-import-not-at-top
    from sqllava_jax.evaluation.generate import Generator  # pylint: disable=g-import-not-at-top
    from sqllava_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=cores)) if cores > 1 else None
    self.generator = Generator(llama_from_hf(directory), eos_id=-1, pad_id=0,  # never stops
                               mesh=mesh)
    self.bandwidth = memory_bandwidth() if cores == 1 else None
    self.header = (f"jax {jax.__version__} on {len(jax.devices())} "
                   f"{jax.devices()[0].platform} device(s)")

  def info(self) -> dict:
    return {"header": self.header, "bandwidth": self.bandwidth}

  def profile(self, prompts, new: int) -> list[tuple[float, str]]:
    return profile_breakdown(self.generator, prompts, new)

  def run(self, prompts, new: int) -> float:
    start = time.perf_counter()
    out = self.generator.generate(prompts, max_new_tokens=new)
    elapsed = time.perf_counter() - start
    assert int(out.num_new.min()) == new, out.num_new
    return elapsed


def profile_breakdown(generator, prompts, new: int, top: int = 12) -> list[tuple[float, str]]:
  """(share of the program's time, 'result shape  operation') of the biggest operations of
  one traced `generate`: each XLA thunk's time, summed by the HLO instruction's result
  shape and the JAX operation it comes from (the compiled program's metadata)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  hlo = generator.program.lower(len(prompts), len(prompts[0]), new).compile().as_text()
  names = {}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([^\s=]+) = (\S+) .*?op_name="([^"]*)"', line)
    if m:
      names[m.group(1)] = f"{m.group(2).split('{')[0]:<22} {m.group(3).split('/')[-1]}"
  with tempfile.TemporaryDirectory() as trace:
    jax.profiler.start_trace(trace)
    generator.generate(prompts, max_new_tokens=new)
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(
        sorted(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True))[-1])
  spent = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          spent[names[event.name]] += event.duration_ns
  total = sum(spent.values()) or 1
  return [(ns / total, name) for name, ns in spent.most_common(top)]


def weight_bytes_per_step(args) -> int:
  """Weights one decode step reads: every layer, the final norm and `lm_head` (the
  embedding table contributes one row per token)."""
  d, f = args.hidden, args.mlp
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return 4 * (args.layers * per_layer + d + d * args.vocab)


def measure(sides: list, prompts, args) -> dict:
  """{name: (seconds for `--new` tokens, prefill seconds)} as lists over repeats; the
  implementations alternate, so load from elsewhere hits both alike."""
  for side in sides:  # compile / warm up both lengths
    side.call("run", prompts, args.new), side.call("run", prompts, 1)
  times = {side.name: ([], []) for side in sides}
  for _ in range(args.repeats):
    for side in sides:
      times[side.name][0].append(side.call("run", prompts, args.new))
      times[side.name][1].append(side.call("run", prompts, 1))
  return times


def report(batch: int, times: dict, args, bandwidth: float) -> None:
  """Medians (and the best run, less disturbed by other load)."""
  weights = weight_bytes_per_step(args)
  for name, (full, prefill) in times.items():
    total, first = statistics.median(full), statistics.median(prefill)
    step = (total - first) / (args.new - 1)
    print(f"batch {batch:>2} {name:<22} {batch * args.new / total:7.1f} tok/s "
          f"(best {batch * args.new / min(full):.1f})  {1e3 * step:6.1f} ms/step  weights "
          f"{weights / step / 1e9:5.1f} GB/s ({weights / step / bandwidth:.0%} of measured "
          f"bandwidth)  prefill {1e3 * first:.0f} ms")
  if "transformers" in times:
    theirs = times["transformers"][0]
    for name, (ours, _) in times.items():
      if name != "transformers":
        print(f"batch {batch:>2} ratio {name} / transformers: "
              f"{statistics.median(theirs) / statistics.median(ours):.2f}x (medians), "
              f"{min(theirs) / min(ours):.2f}x (best runs)")


def main() -> None:
  import ab  # pylint: disable=g-import-not-at-top
  args = parse_args()
  print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; each implementation in its "
        f"own process")
  with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
    hf = stack.enter_context(ab.Side("transformers", HFWorker, args, directory))
    ours = stack.enter_context(ab.Side("sqllava-jax", OursWorker, directory))
    sides = [ours]
    if args.cores > 1:
      sides.append(stack.enter_context(ab.Side(f"sqllava-jax tensor={args.cores}", OursWorker,
                                               directory, args.cores)))
    if args.skip_hf:
      hf.close()
    else:
      sides.append(hf)
    copy, read = ours.info["bandwidth"]
    bandwidth = max(copy, read)
    print("; ".join(side.info["header"] for side in sides if side is not hf) +
          f"; {hf.info['header']}")
    print(f"memory bandwidth: numpy copy (read + write) {copy / 1e9:.1f} GB/s, jitted sum "
          f"(read) {read / 1e9:.1f} GB/s; weights read per decode step: "
          f"{weight_bytes_per_step(args) / 1e6:.0f} MB")
    rng = np.random.default_rng(0)
    for batch in args.batches:
      prompts = rng.integers(3, args.vocab, size=(batch, args.prompt)).tolist()
      report(batch, measure(sides, prompts, args), args, bandwidth)
      if args.profile:
        for share, name in ours.call("profile", prompts, args.new):
          print(f"  profile batch {batch:>2}: {100 * share:5.1f} %  {name}")
      print(f"load average now {os.getloadavg()}", flush=True)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
